"""`omni bench serve`: a load client for any OpenAI-compatible server."""
