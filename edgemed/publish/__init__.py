"""Delivery of results to a broker: settings (``config``), the paho link (``mqtt``) and the outbox drain
(``delivery``). Importing this package imports neither paho nor pydantic; import the sub-modules you need.
"""
