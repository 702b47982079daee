"""The site: burst balancing, calibrating thresholds on the site's own flows, the learning period,
and reading the site's flows from captures, flow tables and flow logs."""
