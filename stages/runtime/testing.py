"""A deterministic stage for tests and benchmarks of the runtime itself.

`echo` (contract: `omni.stages.contracts.echo`) returns, for every input tensor `x`, the tensor
`x * 2 + 1` in its own dtype, in `chunks` replies (each an `EchoReply` with the chunk index),
sleeping `delay_s` before each so a test can catch a request in flight. `fail` makes the
request raise; `hang` wedges the worker for good (only a kill ends it). An empty body asks for
the defaults (one chunk, no delay), so a test of the runtime can send tensors alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from omni.stages.contracts.echo import CONTRACT, ROLE, EchoParams, EchoReply, EchoStats
from omni.stages.runtime.worker import (
    StageOutput,
    StreamingStageWorker,
    WorkerOptions,
    WorkerRequest,
    register_worker,
)


@register_worker(ROLE)
class EchoWorker(StreamingStageWorker):
    def __init__(self, options: WorkerOptions) -> None:
        super().__init__(options)
        self.replies = 0  # sent so far, for the heartbeat's stats

    def handle(self, request: WorkerRequest) -> Iterator[StageOutput]:
        params = CONTRACT.decode_request(request.body) if request.body else EchoParams()
        for index in range(params.chunks):
            if params.delay_s:
                time.sleep(params.delay_s)
            if params.fail:
                raise RuntimeError(f"asked to fail at chunk {index}")
            while params.hang:
                time.sleep(3600)
            self.replies += 1
            yield StageOutput(
                request_id=request.request_id,
                tensors={name: x * 2 + 1 for name, x in request.inputs.items()},
                reply=EchoReply(chunk=index, device=self.options.device, model=self.options.model),
                finished=index == params.chunks - 1,
            )

    def stats(self) -> EchoStats:
        return EchoStats(requests_active=len(self._active), replies=self.replies)
