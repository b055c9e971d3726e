"""The Step-Video-TI2V prompt conventions: its own magic suffix and negative prompt, picked by mode."""

import pytest

import stepvideo_core
from stepvideo_core.text.encoder import (NEGATIVE_PROMPT, POSITIVE_MAGIC, TI2V_MAGIC, TI2V_NEGATIVE_PROMPT,
                                         magic_prompts, with_magic)
from tests.oracle import OracleFixture


def test_ti2v_strings_are_the_official_defaults():
    """The fixture's metadata holds TI2V's stepvideo/config.py --pos_magic / --neg_magic, as the oracle read them."""
    defaults = OracleFixture("stepvideo_ti2v_dit_tiny.safetensors").meta["defaults"]
    assert TI2V_MAGIC == defaults["pos_magic"]
    assert TI2V_NEGATIVE_PROMPT == defaults["neg_magic"]
    assert TI2V_MAGIC.startswith("画面中的主体动作表现生动自然") and TI2V_MAGIC.endswith("清晰。")
    assert TI2V_NEGATIVE_PROMPT.endswith("畸形手指")  # no final "。", unlike T2V's
    assert stepvideo_core.TI2V_MAGIC is TI2V_MAGIC and stepvideo_core.TI2V_NEGATIVE_PROMPT is TI2V_NEGATIVE_PROMPT


def test_magic_prompts_by_mode():
    assert magic_prompts("t2v") == magic_prompts() == (POSITIVE_MAGIC, NEGATIVE_PROMPT)
    assert magic_prompts("ti2v") == magic_prompts("Step-Video-TI2V") == (TI2V_MAGIC, TI2V_NEGATIVE_PROMPT)
    assert magic_prompts("Step-Video-T2V-Turbo") == (POSITIVE_MAGIC, NEGATIVE_PROMPT)
    assert with_magic("一只猫", magic=TI2V_MAGIC) == "一只猫" + TI2V_MAGIC  # plain concatenation, as officially
    with pytest.raises(ValueError, match="unknown prompt mode 'video'"):
        magic_prompts("video")
