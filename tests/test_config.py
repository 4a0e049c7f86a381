"""EngineConfig from yaml files (``base_config`` chains), ``key=value`` overrides and kwargs.

Every error must name the key (or file) that caused it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from paged_jax.config import EngineConfig, load_config, parse_overrides

CONFIGS = Path(__file__).parent.parent / "configs"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- chaining


def test_child_overrides_base_and_inherits_the_rest(tmp_path):
    _write(tmp_path / "base.yaml", "page_size: 8\nmax_num_seqs: 4\nseed: 3\n")
    child = _write(tmp_path / "child.yaml", "base_config: base.yaml\nmax_num_seqs: 12\n")
    cfg = load_config(child)
    assert (cfg.page_size, cfg.max_num_seqs, cfg.seed) == (8, 12, 3)
    assert cfg.max_num_batched_tokens == 512  # untouched by both files: the dataclass default


def test_relative_base_resolved_against_the_child_folder(tmp_path, monkeypatch):
    _write(tmp_path / "shared" / "base.yaml", "page_size: 32\n")
    child = _write(tmp_path / "exp" / "child.yaml", "base_config: ../shared/base.yaml\nseed: 7\n")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # the working directory must not matter
    cfg = load_config(child)
    assert (cfg.page_size, cfg.seed) == (32, 7)


def test_absolute_base_path(tmp_path):
    base = _write(tmp_path / "a" / "base.yaml", "max_num_seqs: 5\n")
    child = _write(tmp_path / "b" / "child.yaml", f"base_config: {base}\n")
    assert load_config(child).max_num_seqs == 5


def test_three_levels(tmp_path):
    _write(tmp_path / "grand.yaml", "page_size: 8\nmax_num_seqs: 2\nseed: 1\n")
    _write(tmp_path / "mid" / "parent.yaml", "base_config: ../grand.yaml\nmax_num_seqs: 6\n")
    leaf = _write(tmp_path / "mid" / "leaf.yaml", "base_config: parent.yaml\nseed: 9\n")
    cfg = load_config(leaf)
    assert (cfg.page_size, cfg.max_num_seqs, cfg.seed) == (8, 6, 9)


def test_empty_yaml_file_gives_defaults(tmp_path):
    cfg = load_config(_write(tmp_path / "empty.yaml", "# nothing here\n"))
    # page_size None: the chip table's on TPU, 16 elsewhere (kernels.resolve_page_size)
    assert cfg.page_size is None and cfg.num_pages is None and cfg.warmup is True


def test_repo_smollm2_config_inherits_base():
    cfg = load_config(CONFIGS / "smollm2-135m.yaml")
    assert cfg.model == "smollm2-135m"
    # Its own keys.
    assert (cfg.max_model_len, cfg.max_num_seqs, cfg.max_num_batched_tokens) == (2048, 16, 256)
    assert cfg.kv_cpu_bytes == 512 * 2**20
    # Inherited from base.yaml.
    assert (cfg.dtype, cfg.page_size, cfg.attn_impl, cfg.warmup, cfg.seed) == (
        "auto",
        None,  # the platform's default page size (kernels.resolve_page_size)
        "auto",
        True,
        0,
    )


# ---------------------------------------------------------------------------- overrides


def test_overrides_parsed_as_yaml_scalars():
    assert parse_overrides(
        ["page_size=8", "kv_memory_fraction=0.5", "warmup=false", "num_pages=null", "model=x"]
    ) == {
        "page_size": 8,
        "kv_memory_fraction": 0.5,
        "warmup": False,
        "num_pages": None,
        "model": "x",
    }


def test_override_value_may_contain_equals():
    assert parse_overrides(["model=a=b"]) == {"model": "a=b"}


def test_overrides_after_file_and_kwargs_after_overrides(tmp_path):
    path = _write(tmp_path / "c.yaml", "page_size: 8\nmax_num_seqs: 4\nseed: 1\nwarmup: true\n")
    cfg = load_config(path, ["max_num_seqs=6", "seed=2", "warmup=false", "num_pages=100"], seed=5)
    assert (cfg.page_size, cfg.max_num_seqs, cfg.seed, cfg.warmup, cfg.num_pages) == (
        8,  # file
        6,  # override beats file
        5,  # kwarg beats override
        False,
        100,
    )


def test_override_null_resets_a_file_value(tmp_path):
    path = _write(tmp_path / "c.yaml", "max_model_len: 256\n")
    assert load_config(path).max_model_len == 256
    assert load_config(path, ["max_model_len=null"]).max_model_len is None


def test_int_accepted_for_float_field():
    cfg = load_config(None, ["kv_memory_fraction=1"])
    assert cfg.kv_memory_fraction == 1.0 and isinstance(cfg.kv_memory_fraction, float)


def test_no_file_no_overrides_is_the_dataclass_default():
    assert load_config() == EngineConfig()
    assert load_config(None, None, page_size=32) == EngineConfig(page_size=32)


def test_replace_validates():
    cfg = EngineConfig().replace(page_size=32)
    assert cfg.page_size == 32
    with pytest.raises(ValueError, match="bogus"):
        EngineConfig().replace(bogus=1)
    with pytest.raises(ValueError, match="page_size"):
        EngineConfig().replace(page_size="abc")


# ---------------------------------------------------------------------------- errors


def test_unknown_key_in_file(tmp_path):
    path = _write(tmp_path / "c.yaml", "page_size: 8\npage_sise: 16\n")
    with pytest.raises(ValueError, match="page_sise"):
        load_config(path)


def test_unknown_key_in_base_file(tmp_path):
    _write(tmp_path / "base.yaml", "max_num_seq: 3\n")
    child = _write(tmp_path / "child.yaml", "base_config: base.yaml\n")
    with pytest.raises(ValueError, match="max_num_seq"):
        load_config(child)


def test_unknown_override_key():
    with pytest.raises(ValueError, match="pagesize"):
        load_config(None, ["pagesize=8"])


def test_unknown_kwarg():
    with pytest.raises(ValueError, match="frobnicate"):
        load_config(None, frobnicate=True)


def test_key_set_twice_in_one_file(tmp_path):
    path = _write(tmp_path / "c.yaml", "page_size: 8\nseed: 1\npage_size: 16\n")
    with pytest.raises(ValueError, match="page_size.*twice"):
        load_config(path)


def test_key_set_twice_in_overrides():
    with pytest.raises(ValueError, match="seed.*twice"):
        load_config(None, ["seed=1", "page_size=8", "seed=2"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("page_size=abc", "page_size"),
        ("page_size=1.5", "page_size"),
        ("warmup=1", "warmup"),
        ("kv_memory_fraction=true", "kv_memory_fraction"),
        ("model=3", "model"),
        ("max_num_seqs=null", "max_num_seqs"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        load_config(None, [override])


def test_wrong_type_in_file_names_the_key(tmp_path):
    path = _write(tmp_path / "c.yaml", "max_num_batched_tokens: [1, 2]\n")
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        load_config(path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("page_size=0", "page_size"),
        ("max_num_seqs=-1", "max_num_seqs"),
        ("max_num_batched_tokens=0", "max_num_batched_tokens"),
        ("kv_cpu_bytes=0", "kv_cpu_bytes"),
        ("kv_memory_fraction=1.5", "kv_memory_fraction"),
        ("kv_memory_fraction=0", "kv_memory_fraction"),
        ("attn_impl=foo", "attn_impl"),
        ("num_pages=1", "num_pages"),
        ("max_model_len=0", "max_model_len"),
        ("dtype=int8", "dtype"),
        ("kv_dtype=fp8", "kv_dtype"),
    ],
)
def test_bad_value_names_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        load_config(None, [override])


def test_boundary_values_accepted():
    cfg = load_config(
        None, ["num_pages=2", "kv_memory_fraction=1.0", "page_size=1", "attn_impl=reference"]
    )
    assert (cfg.num_pages, cfg.kv_memory_fraction, cfg.page_size, cfg.attn_impl) == (
        2,
        1.0,
        1,
        "reference",
    )


def test_base_config_cycle(tmp_path):
    _write(tmp_path / "a.yaml", "base_config: b.yaml\nseed: 1\n")
    _write(tmp_path / "b.yaml", "base_config: a.yaml\nseed: 2\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_base_config_self_cycle(tmp_path):
    path = _write(tmp_path / "self.yaml", "base_config: self.yaml\n")
    with pytest.raises(ValueError, match="cycle.*self.yaml"):
        load_config(path)


def test_missing_base_file(tmp_path):
    child = _write(tmp_path / "child.yaml", "base_config: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        load_config(child)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("text", ["- page_size\n- 8\n", "just a string\n", "42\n"])
def test_yaml_not_a_mapping(tmp_path, text):
    path = _write(tmp_path / "list.yaml", text)
    with pytest.raises(ValueError, match="mapping"):
        load_config(path)


@pytest.mark.parametrize("item", ["page_size", "=8", ""])
def test_override_without_equals(item):
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides([item])


def test_config_is_frozen():
    cfg = EngineConfig()
    with pytest.raises(AttributeError):
        cfg.page_size = 32  # type: ignore[misc]


def test_override_not_yaml_names_the_key():
    with pytest.raises(ValueError, match="compilation_cache_dir"):
        parse_overrides(["compilation_cache_dir=[unclosed"])


def test_file_not_yaml_names_the_file(tmp_path):
    path = _write(tmp_path / "broken.yaml", "page_size: [8\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        load_config(path)
