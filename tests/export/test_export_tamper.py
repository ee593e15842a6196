"""``rq check`` fails when the exported INT4 weights are not the ones the reference ran with."""

from __future__ import annotations

import shutil

from rq.export import check_export
from rq.export.onnx_file import external_location


def test_edited_int4_byte_fails_the_check(exported, tmp_path):
    build = tmp_path / "build"
    shutil.copytree(exported("mixtral").out_dir, build)
    layer0 = next(layer for layer in exported("mixtral").manifest["moe_layers"] if layer["index"] == 0)
    data_file, offset, length = external_location(build / "model.onnx", layer0["weights"]["w_in_q"])
    assert length > 0
    with open(data_file, "r+b") as handle:  # first byte of INT4 copy 0: two nibbles, sign bits flipped
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x88]))
    report = check_export(build)
    assert not report.passed
    failed = {(row.phase, row.output) for row in report.failures()}
    assert ("prefill", "logits") in failed or ("streaming", "logits") in failed, report.summary()
    assert report.summary().splitlines()[-1].startswith("FAILED |")
    assert "FAILED |" in report.summary()
