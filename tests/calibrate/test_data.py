"""Calibration text: several `--data` paths, one per domain, keep their order so windows stay within a domain."""

import pytest
import torch
from typer.testing import CliRunner

from rq.calibrate.data import load_token_data, load_tokenizer, read_texts
from rq.calibrate.stats import CalibrationStats
from rq.cli.main import app
from rq.demo.corpus import demo_checkpoint_dir
from rq.errors import RQError


def _write(path, word, lines):
    path.write_text("\n".join(f"{word} {i} {word}" for i in range(lines)) + "\n")
    return path


def test_several_paths_keep_their_order(tmp_path):
    tokenizer = load_tokenizer(demo_checkpoint_dir())
    first = _write(tmp_path / "code.txt", "def", 200)
    second = _write(tmp_path / "prose.txt", "the", 200)
    texts, description = read_texts([first, second])
    assert texts[0].startswith("def") and texts[1].startswith("the")
    assert str(first) in description and str(second) in description and " + " in description
    data = load_token_data(tokenizer, [first, second], seq_len=16, max_sequences=20, seed=3)
    marks = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("def", " the")]
    domain = [0 if (row == marks[0]).any() else 1 for row in data.sequences]
    assert domain == sorted(domain) and set(domain) == {0, 1}  # every code sequence before every prose one
    # one path behaves as before
    alone = load_token_data(tokenizer, first, seq_len=16, max_sequences=None)
    assert torch.equal(alone.sequences, load_token_data(tokenizer, [first], seq_len=16, max_sequences=None).sequences)


def test_no_path_is_a_one_line_error():
    with pytest.raises(RQError, match="no data path given"):
        read_texts([])


def test_calibrate_takes_data_per_domain(tiny_checkpoints, text_file, tmp_path):
    ckpt = tiny_checkpoints("qwen2_moe")
    other = _write(tmp_path / "other.txt", "the", 400)
    result = CliRunner().invoke(app, ["calibrate", str(ckpt), "--data", str(text_file), "--data", str(other),
                                      "--out", str(tmp_path / "stats"), "--seq-len", "32", "--sequences", "8",
                                      "--batch-size", "4", "--window", "4"])
    assert result.exit_code == 0, result.output
    stats = CalibrationStats.load(tmp_path / "stats")
    assert str(other) in stats.calibration.data and str(text_file) in stats.calibration.data
    assert stats.windows.teacher_forced == 2
    assert "no decode routing recorded" in result.output and "--generate 33" in result.output
