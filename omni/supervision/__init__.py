"""The orchestrator's hold on its stages: routing requests to replicas and supervising the
processes that run them."""
