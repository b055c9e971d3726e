"""Running the 30B DiT on small GPUs: block streaming and the automatic memory plan."""

from .schedule import Action, copies_per_pass, plan_pass, simulate, slot_count, split_blocks
from .streamer import BlockStreamer, SamplingInterrupted

__all__ = ["Action", "BlockStreamer", "SamplingInterrupted", "copies_per_pass", "plan_pass", "simulate",
           "slot_count", "split_blocks"]
