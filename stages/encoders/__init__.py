"""Encoder stages: vision (`omni.stages.encoders.vision`) and audio towers that turn media
into embeddings. Modules are imported by role (`BUILTIN_WORKER_MODULES`), not from here, so
importing this package loads no model code."""
