"""The lab: real servers, clients and attack tools in network namespaces, captured at one point
and labelled from what each tool was told to do (see docs/lab.md)."""
