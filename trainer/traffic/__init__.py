"""trafficgen: labelled synthetic captures (benign traffic and attacks) with real protocol bytes,
the fast fixture for unit tests."""
