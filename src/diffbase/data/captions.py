"""Caption handling the trainers' users rely on: a trigger word put into every caption (`data.trigger`: each
`[trigger]` replaced, and the word put first where a caption lacks it, as ai-toolkit does), and tag shuffling
(`data.shuffle_captions`: comma-separated tags in a new order each time an image is drawn, the first
`data.keep_tags` left in place, as kohya's keep_tokens)."""

from __future__ import annotations

import random

PLACEHOLDER = "[trigger]"


def with_trigger(caption: str, trigger: str | None) -> str:
    """`caption` with the trigger word in it (unchanged without a trigger)."""
    if not trigger:
        return caption
    caption = caption.replace(PLACEHOLDER, trigger)
    if trigger in caption:
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def shuffled(caption: str, keep: int, rng: random.Random) -> str:
    """The caption's comma-separated tags in a random order, the first `keep` where they were."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)
