"""`vlcp distill --help` groups its options in sections, in the order a run meets them."""
import re

from click.testing import CliRunner

from vlcp.cli.main import cli

SECTIONS = ["Data", "Captions", "Prototypes", "Fine-tuning", "Synthesis", "Refinement", "Post-sampling", "Masks",
            "Resources", "Output and run control"]


def help_of(*command: str) -> str:
    r = CliRunner().invoke(cli, [*command, "--help"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def sections(help_text: str) -> dict[str | None, list[str]]:
    """Heading -> the options listed under it (their first flag), in help order; None: outside any section."""
    out: dict[str | None, list[str]] = {None: []}
    current = None
    for line in help_text.split("\nOptions:\n", 1)[1].splitlines():
        heading = re.match(r"^  ([A-Z][\w -]*):(\s|$)", line)
        grouped = re.match(r"^    (-[-\w]+)", line)
        loose = re.match(r"^  (-[-\w]+)", line)
        if heading:
            current = heading.group(1)
            assert current not in out, f"section {current} twice"
            out[current] = []
        elif grouped:
            out[current].append(grouped.group(1))
        elif loose:
            out[None].append(loose.group(1))
    return out


def test_distill_help_lists_the_sections_in_order():
    assert [s for s in sections(help_of("distill")) if s is not None] == SECTIONS


def test_options_sit_under_their_section():
    found = sections(help_of("distill"))
    spots = {"Data": ["--data", "--ipc", "--classes", "--max-per-class", "--crop"],
             "Captions": ["--captioner", "--captions-from", "--clean-captions"],
             "Prototypes": ["--contamination", "--beta", "--top-k", "--text-strategy"],
             "Fine-tuning": ["--finetune", "--finetune-lr", "--finetune-epochs", "--finetune-ema"],
             "Synthesis": ["--diffusion", "--strength", "--guidance-scale", "--steps", "--image-size"],
             "Refinement": ["--refine", "--refine-beta", "--detector", "--detector-epochs", "--min-caption-match"],
             "Post-sampling": ["--post-sample", "--pool-multiplier", "--sas-keep", "--select", "--clip"],
             "Masks": ["--object-masks", "--mask-prompt", "--segmenter", "--min-foreground"],
             "Resources": ["--caption-batch-size", "--latent-batch-size", "--synthesis-batch-size",
                           "--gradient-checkpointing"],
             "Output and run control": ["--out", "--until", "--tiny", "--seed", "--config", "--force", "--dry-run"]}
    for section, flags in spots.items():
        for flag in flags:
            assert flag in found[section], (flag, section, found[section])
    assert found["Fine-tuning"][:2] == ["--finetune", "--finetune-method"]


def test_every_distill_option_is_in_exactly_one_section():
    found = sections(help_of("distill"))
    listed = [flag for section, flags in found.items() if section is not None for flag in flags]
    options = [p.opts[0] for p in cli.commands["distill"].params
               if p.expose_value or p.name in ("config", "list_configs")]
    options = [o for o in options if o not in ("-h", "--help")]
    assert len(options) == 87  # 78 of the flat command, --config, --list-configs, --log-dir, --caption-engine,
    # --synthesis-compile, --finetune-micro-batch, --finetune-compile, --finetune-precision, --finetune-channels-last
    assert sorted(listed) == sorted(options) and len(listed) == len(set(listed))
    assert found[None] == ["-h"]  # only --help stands outside the sections
    assert all(found[s] for s in SECTIONS)


def test_other_commands_keep_a_flat_option_list():
    """Grouping is distill's alone: `vlcp refine` shares the refinement options, not their section."""
    found = sections(help_of("refine"))
    assert list(found) == [None]
    assert found[None] == ["--data", "--out", "--refine-candidates", "--refine-top-k", "--refine-beta",
                           "--detector", "--detector-arch", "--detector-epochs", "--log-dir", "--force", "-h"]
