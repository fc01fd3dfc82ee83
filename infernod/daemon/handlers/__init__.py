"""Request handlers, one module per request family; ``table.py`` holds the one table of
request type -> minimum role, body schema and handler that the server's dispatch reads."""
