"""`inferno-gateway`: OpenAI's HTTP API in front of infernod, as a separate process.

``app`` holds the routes and handlers, ``openai_wire`` translates OpenAI bodies to the
daemon's requests and back (pure), ``sse`` frames streams, ``errors`` maps daemon error
codes to HTTP statuses in one table, ``auth`` is the API-key hook, ``__main__`` the command.
"""
