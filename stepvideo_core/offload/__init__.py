"""Running the 30B DiT on small GPUs: block streaming and the automatic memory plan."""

from .planner import PlanInputs, auto_plan, estimate_peak, plan, weight_bytes
from .schedule import Action, copies_per_pass, plan_pass, simulate, slot_count, split_blocks
from .streamer import BlockStreamer, SamplingInterrupted

__all__ = ["Action", "BlockStreamer", "PlanInputs", "SamplingInterrupted", "auto_plan", "copies_per_pass",
           "estimate_peak", "plan",
           "plan_pass", "simulate", "slot_count", "split_blocks", "weight_bytes"]
