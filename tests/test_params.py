"""SamplingParams validation and the SDK's import weight."""

import subprocess
import sys

import msgspec
import pytest

from dinfer_async import InvalidRequestError, SamplingParams


def test_defaults_are_valid_and_match_the_design():
    p = SamplingParams().validate()
    assert (p.gen_length, p.block_length, p.decoder, p.threshold, p.cache) == (256, 32, "threshold", 0.9, "dual")
    assert p.steps is None and p.total_steps == 256 and p.early_stop is True


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(gen_length=0), "gen_length"),
        (dict(gen_length=100, block_length=32), "gen_length"),
        (dict(block_length=-1), "block_length"),
        (dict(decoder="greedy"), "decoder"),
        (dict(cache="paged"), "cache"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(steps=0), "steps"),
        (dict(gen_length=64, block_length=32, steps=3), "steps"),
        (dict(remasking="lowest"), "remasking"),
        (dict(seed=-1), "seed"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(early_stop="yes"), "early_stop"),
    ],
)
def test_bad_values_name_their_field(kw, field):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kw).validate()
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_limit_from_the_model():
    with pytest.raises(InvalidRequestError, match="gen_length.*limit of 128"):
        SamplingParams(gen_length=256).validate(max_gen_length=128)


def test_wire_round_trip_and_unknown_fields():
    p = SamplingParams(gen_length=64, decoder="fixed", steps=32, seed=7)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p
    with pytest.raises(msgspec.ValidationError, match="gen_lenght"):
        msgspec.convert({"gen_lenght": 64}, SamplingParams)


def test_importing_the_sdk_does_not_import_torch():
    code = "import sys, dinfer_async, dinfer_async.batch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_our_kernels_package_does_not_break_transformers():
    """Hugging Face also publishes a package named `kernels`; transformers must not mistake ours for it."""
    code = (
        "import kernels, transformers; from transformers import AutoTokenizer; "
        "from transformers.utils import is_kernels_available; assert not is_kernels_available(); "
        "import transformers.integrations.hub_kernels; from transformers import PreTrainedModel; "
        "from workers.bundled import MODEL_DIR; "
        "t = AutoTokenizer.from_pretrained(str(MODEL_DIR)); print(kernels.__file__, len(t))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "/kernels/__init__.py" in out.stdout
