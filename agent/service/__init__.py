"""The service: the engine (meter, score, rules, incidents, alerts, metrics), the daemon and
replay, the configuration file, Prometheus metrics and drift. The top layer."""
