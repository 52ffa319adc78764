"""A deterministic stage for tests and benchmarks of the runtime itself.

`echo` returns, for every input tensor `x`, the tensor `x * 2 + 1` in its own dtype, in
`chunks` replies (each carrying the chunk index in `data`), sleeping `delay_s` before each so a
test can catch a request in flight. `fail: true` makes the request raise.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from omni.stages.runtime.worker import (
    StageOutput,
    StreamingStageWorker,
    WorkerRequest,
    register_worker,
)


@register_worker("echo")
class EchoWorker(StreamingStageWorker):
    def handle(self, request: WorkerRequest) -> Iterator[StageOutput]:
        chunks = int(request.params.get("chunks", 1))
        delay_s = float(request.params.get("delay_s", 0.0))
        if chunks < 1:
            raise ValueError(f"chunks is {chunks}; it must be >= 1")
        for index in range(chunks):
            if delay_s:
                time.sleep(delay_s)
            if request.params.get("fail"):
                raise RuntimeError(f"asked to fail at chunk {index}")
            yield StageOutput(
                request_id=request.request_id,
                tensors={name: x * 2 + 1 for name, x in request.inputs.items()},
                data={"chunk": index, "device": self.options.device, "model": self.options.model},
                finished=index == chunks - 1,
            )
