"""The event log the worker writes (DESIGN.md "The log"): its tables, the buffer of rows waiting
for a flush, and exports of it for other tools."""
