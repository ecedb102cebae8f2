"""The event log the worker writes (DESIGN.md "The log"): its Delta tables, the buffer of rows
waiting for a flush, their compaction and vacuum (and the ``streamrec log`` commands), and
exports of it for other tools."""
