"""Delivery of results to a broker, and the MQTT core the dashboard's ingest shares.

* ``config``: broker settings (URL, TLS, credentials, reconnect policy), validated from a profile's text.
* ``publisher``: the ``Publisher``/``Link`` protocols ``Delivery`` depends on, ``Message`` and ``Subscription``.
* ``policy``: the link's decisions (refusals, back-off, the MQTT 5 -> 3.1.1 fall back), pure functions.
* ``tls``: the one SSL context builder and what a TLS failure means.
* ``mqtt``: ``MqttLink``, the only module in edgemed that imports paho-mqtt.
* ``delivery``: the outbox drain (``Delivery``) and ``edgemed flush``.

Importing this package imports neither paho nor pydantic; import the sub-modules you need.
"""
