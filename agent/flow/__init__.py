"""Flows: the bounded flow table that folds packet columns into bidirectional flows, the flow
records it hands on, payload statistics and flow identity (Community ID, addresses and times as
text). Imports only capture."""
