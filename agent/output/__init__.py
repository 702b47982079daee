"""Output: column text formatting, flow tables (CSV, JSON lines, Parquet), the flow log and its
rotation, and EVE JSON alerts under a line budget. Imports the layers before it."""
