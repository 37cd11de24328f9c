"""benchmarks/real_shapes.py: the stored configurations are the published ones, and the estimate is arithmetic
on the measured rates (the measurements themselves run in the benchmark, not here)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def rs():
    spec = importlib.util.spec_from_file_location("real_shapes", ROOT / "benchmarks" / "real_shapes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["real_shapes"] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def test_configs_are_the_published_architectures(rs):
    from transformers import LlavaConfig

    llava = LlavaConfig(**rs._config("llava-1.5-7b-hf.json"))
    t, v = llava.text_config, llava.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size) == (
        4096, 11008, 32, 32, 32064)
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size) == (1024, 24, 336, 14)
    unet = rs._config("sd-v1-5-unet.json")
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert unet["sample_size"] * 2 ** (len(rs._config("sd-v1-5-vae.json")["block_out_channels"]) - 1) == 512
    assert rs._config("sd-v1-5-text_encoder.json")["num_hidden_layers"] == 12


def test_estimate_scales_the_measured_rates_to_imagenette(rs):
    rates = {"captions": (2.0, 20.0), "latents": (10.0, 3.0), "synthesis": (0.5, 5.0)}
    est = {stage.split(" ")[0] + (" " + stage.split(" ")[1] if stage.startswith("finetune") else ""): (h, gb)
           for stage, h, gb in rs.estimate(rates, {("lora", True): (1.5, 11.0)})}
    assert est["captions"] == pytest.approx((9469 / 2.0 / 3600, 20.0))
    assert est["latents"] == pytest.approx((9469 / 10.0 / 3600, 3.0))
    assert est["finetune lora"] == pytest.approx((8 * 1184 * 1.5 / 3600, 11.0))  # 8 epochs x ceil(9469 / 8)
    assert est["synthesis"] == pytest.approx((100 / 0.5 / 3600, 5.0))


def test_estimate_merges_the_json_of_runs_of_parts_of_the_stages(rs, tmp_path, capsys):
    """The GPU plan runs the captions and the other stages in two calls (a time limit each); --estimate makes
    the `vlcp distill` table from their --json files, as one run of all stages would have."""
    import roofline as rf

    s = rf.Setup("cuda", False, None, None)
    a = rs.figures(s, "NVIDIA H200", {"captions": (20.0, 60.0)}, {})
    b = rs.figures(s, "NVIDIA H200", {"latents": (70.0, 9.0), "synthesis": (5.0, 8.0)},
                   {("full", "old"): (0.30, 23.0), ("full", "new"): (0.12, 40.0), ("lora", True): (0.3, 6.2)})
    (tmp_path / "a.json").write_text(rs.json.dumps(a))
    (tmp_path / "b.json").write_text(rs.json.dumps(b))
    assert rs.main(["--estimate", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    plain = {"captions": 20.0, "latents": 70.0, "synthesis": 5.0}
    for ds in (rf.IMAGENETTE, rf.IMAGENET):
        for g in (1, 8):
            hours = rf.distill_hours(plain, 0.12, ds, 10, g)  # the fastest new fine-tuning path
            assert f"| {ds.name} | {g} | {' | '.join(f'{hours[k]:.2f}' for k in hours)} |" in out
    (tmp_path / "c.json").write_text(rs.json.dumps(rs.figures(s, "NVIDIA A100", {}, {})))
    with pytest.raises(SystemExit, match="different devices"):
        rs.main(["--estimate", str(tmp_path / "a.json"), str(tmp_path / "c.json")])
