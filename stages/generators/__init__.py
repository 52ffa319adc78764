"""Generator stages: images through diffusers (`omni.stages.generators.image`) and speech
(`omni.stages.generators.speech`). Modules are imported by role (`BUILTIN_WORKER_MODULES`),
not from here, so importing this package loads no model code."""
