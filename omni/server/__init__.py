"""The OpenAI-compatible HTTP server: request models, the orchestrator over stages, the app."""
