"""Features: host context (what each host did in a time window), the versioned feature schema and
its one extractor, and the flow meter that wires capture, the flow table and the extractor
together. Imports capture and flow."""
