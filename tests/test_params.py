"""SamplingParams validation and the SDK's import weight."""

import subprocess
import sys

import msgspec
import pytest

from dinfer_async import InvalidRequestError, SamplingParams


def test_defaults_are_valid_and_match_the_design():
    p = SamplingParams().validate()
    assert (p.gen_length, p.block_length, p.decoder, p.threshold, p.cache) == (
        256,
        32,
        "threshold",
        0.9,
        "dual",
    )
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


def test_our_kernels_do_not_clash_with_hugging_face_kernels(tmp_path):
    """transformers depends on Hugging Face's package named `kernels`; ours is installed as
    `dinfer_kernels`, so from any directory each name resolves to its own package."""
    code = (
        "import dinfer_kernels, transformers; from transformers import AutoTokenizer; "
        "from workers.bundled import MODEL_DIR; import workers.models.layers; "
        "t = AutoTokenizer.from_pretrained(str(MODEL_DIR)); print(dinfer_kernels.__file__, len(t))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0].endswith("/kernels/__init__.py")
    assert "site-packages" not in out.stdout.split()[0]


def test_max_tokens_sets_gen_length_in_whole_blocks():
    assert SamplingParams(max_tokens=40).validate().gen_length == 64
    assert SamplingParams(max_tokens=64, block_length=32).validate().gen_length == 64
    assert SamplingParams(max_tokens=1, block_length=8, gen_length=256).validate().gen_length == 8
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(max_tokens=0).validate()
    assert e.value.field == "max_tokens"
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(max_tokens=1000).validate(max_gen_length=512)
    assert e.value.field == "gen_length"


@pytest.mark.parametrize("stop,field", [([], "stop"), ([""], "stop[0]"), (["a", 3], "stop[1]")])
def test_bad_stop_strings_name_the_field(stop, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(stop=stop).validate()
    assert e.value.field == field
