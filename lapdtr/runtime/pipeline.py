"""Pipeline inference on ``torch.distributed`` ranks, with a control plane on the rendezvous store
and recovery from dead or drained ranks (Algorithm 3 of LAP-DTR per item).

One function, :func:`run_rank`, is what every rank runs, whether spawned locally or by torchrun
(``lapdtr.distribute`` runs the same session with a user's inputs). Rank 0 (the driver) is the
coordinator: it prepares the checkpoint and the plan, feeds the inputs, collects the outputs,
watches heartbeats and energy telemetry, and re-plans; it may run stages too.

The rooms, in data-flow order: ``control`` (store keys, heartbeats, watcher), ``prepare``
(set-up and plan resolution), ``steps`` (a worker's per-item chain: decode, settings, run,
encode, cache, send), ``worker`` (a rank's state and the follower loop), ``coordinator``
(inputs, outputs, monitoring, re-planning), ``assemble`` (the report), ``session`` (a rank's
life: join, set-up, process group, go, stop); ``collective`` runs tensor and ensemble mode.

Work is split into *items* (request ``r``, micro-batch ``b``: item ``r * m + b``). A message
carries an item and the unit its receiver starts at, so after a re-plan any rank can resume an
item from any cached boundary: the holder of the furthest boundary re-sends it to the rank that
now owns the next unit. The store keys are listed in ``control``.

Control without polling. After every control change the coordinator sends each follower a
control message on the data path (``Transport.send_control``: its epoch, and how far items are
done), so followers block on their message queue and read the store only when told to; the
coordinator also sends one every ``_PUBLISH_S`` while items complete, so followers release
finished sends and evict their caches. A follower looks at the store by itself only after
``_SAFETY_POLL_S`` without any message, and learns of the coordinator's death from its stream
ending (a ``gone`` message). On a machine with fewer cores than ranks this matters: a store
round trip every few milliseconds on every rank costs the stages measurable throughput.

Failures. A gloo process group keeps working for point-to-point traffic between the survivors
when a member dies (only ops with the dead rank fail), so the runtime keeps one group for the
whole run and tells the plan generations apart by the generation in every header (a message of
an older generation is received and dropped, so every send completes); only receiver threads
block on a peer, so a dead peer cannot hang a rank's main loop. The
alternatives cost more: a fresh process group per generation needs every survivor to
rendezvous again, and routing boundaries through the coordinator doubles every transfer. (NCCL
point-to-point ignores tags and communicators do not survive a member's death, so with the
``nccl`` backend the pipeline runs without re-planning: an event that needs one ends the run
with an error saying so.) Detection takes up to
``heartbeat_timeout_s`` for a dead rank and one telemetry round for a drained one; each
``ReplanEvent`` in the report records both times.
"""
from __future__ import annotations

from .control import RendezvousError
from .prepare import build_plan_from_cuts, check_plan, default_devices, request_input, stage_settings
from .session import resolve_backend, run_rank

__all__ = ["run_rank", "build_plan_from_cuts", "check_plan", "request_input", "default_devices",
           "stage_settings", "resolve_backend", "RendezvousError"]
