"""The 7B rehearsal (rehearse.py) in its smallest form: the README's "Qwen2.5-VL-7B" commands, as the README
writes them, run to the end at Qwen2.5-VL-7B's widths (one decoder layer, two vision blocks, small images, a 16384
vocabulary) on 2 gloo ranks, and the checkpoint they train has 7B's widths.

    python -m pytest -q test_rehearse.py
"""
import json
import re

from conftest import HERE, run


def test_the_readme_7b_commands_run_at_7b_widths(tmp_path):
    out = tmp_path / "rehearse"
    p = run(["rehearse.py", "--smallest", "--out", out], timeout=1200)
    assert "rehearsal OK: 7 commands" in p.stdout, p.stdout[-3000:]
    result = json.loads((out / "rehearse.json").read_text())
    assert result["ok"] and all(c["exit"] == 0 for c in result["commands"])
    # each command is a line of the README's 7B block, with only $M, the image and the process count substituted
    block = open(HERE + "/README.md").read().split("## Qwen2.5-VL-7B", 1)[1].split("\n## ", 1)[0]
    for c in result["commands"]:
        line = c["command"].replace(str(out / "model"), "$M").replace("--nproc_per_node 2", "--nproc_per_node 8")
        line = re.sub(r"\S+/img/q0\.jpg", "image.png", line)
        assert line in " ".join(block.replace("\\\n", " ").split()), f"not in the README's 7B block: {line}"
    # what they printed: every example checked, the PCA basis of 7B-wide targets, two FSDP2 steps, an answer
    said = ["\n".join(c["output_tail"]) for c in result["commands"]]
    assert "all 4 examples are good" in said[1], said[1]
    assert re.search(r"n=144 d=3584 k=\d+", said[2]), said[2]
    assert "done: 2 steps, 0 bad examples skipped" in said[4], said[4]
    config = json.loads((out / "out" / "gap" / "config.json").read_text())
    text = config.get("text_config", config)
    assert (text["hidden_size"], text["intermediate_size"], text["num_attention_heads"],
            text["num_key_value_heads"]) == (3584, 18944, 28, 4)
    assert config["vision_config"]["hidden_size"] == 1280 and config["vision_config"]["out_hidden_size"] == 3584
    gap = json.loads((out / "out" / "gap" / "gap.json").read_text())
    assert gap["latent_tokens"] == 36 and gap["head_config"]["d"] == 3584 and gap["fsdp"] and gap["pack"]
