"""`python -m qwen_jax.eval.toy_steering`: real images noised to sigma0, denoised under their own
caption and under one with a word changed; what the committed teacher reads and what it ignores."""

from __future__ import annotations

import json

from qwen_jax.eval import toy_steering
from qwen_jax.toy import all_prompts, parse_prompt
from qwen_jax.toy.folders import TEACHER

PROMPTS = all_prompts()[::14]   # 12 captions: every shape, most colours


def test_changed_caption_changes_one_word():
    for caption in all_prompts():
        fg, shape, bg = parse_prompt(caption)
        new_shape = parse_prompt(toy_steering.changed_caption(caption, "shape"))
        new_colour = parse_prompt(toy_steering.changed_caption(caption, "colour"))
        assert new_shape[0] == fg and new_shape[2] == bg and new_shape[1] != shape
        assert new_colour[1:] == (shape, bg) and new_colour[0] not in (fg, bg)


def test_steering_of_the_committed_teacher(tmp_path):
    """Near sigma0 = 0 the real image comes back whatever the caption says (kept = 1, steering 0:
    the noising and the sigma grid are right); from pure noise the changed colour word is
    followed (the changed caption reaches the model). The teacher's shape word: docs/toy_world.md."""
    assert toy_steering.main(["--model", str(TEACHER), "--sigma0", "1.0", "0.05", "--steps", "8",
                              "--prompts", *PROMPTS, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "steering.json").read_text())["results"]
    for word in ("shape", "colour"):
        assert results[word]["0.05"]["kept"] == 1.0 and results[word]["0.05"]["steering"] == 0.0
    assert results["colour"]["1.0"]["followed"] >= 0.75 and results["colour"]["1.0"]["steering"] >= 0.6
    assert toy_steering.main(["--model", str(TEACHER), "--sigma0", "1.5", "--out", str(tmp_path)]) == 2


def test_bad_prompt_is_one_line(tmp_path, capsys):
    assert toy_steering.main(["--model", str(TEACHER), "--prompts", "a red blob", "--out", str(tmp_path)]) == 2
    assert "--prompts" in capsys.readouterr().err

