"""Prompt datasets (hiar.io.prompts): .txt / .jsonl / .parquet, local directories and S3, dedup, the held-out split,
and every bad input failing before any compute with a message naming the URI."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hiar.config import load_config
from hiar.io.prompts import PromptSet, load_prompts, prompt_set, tiny_prompt_set

PROMPTS = [f"a {c} {s} moves {d}" for c in ("red", "green", "blue", "white") for s in ("cube", "ball", "cone")
           for d in ("left", "right")]  # 24 distinct


def write_txt(path, prompts):
    path.write_text("\n".join(prompts) + "\n")
    return path


def write_jsonl(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    return path


def write_parquet(path, prompts):
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts}), path)
    return path


def check_split(ps: PromptSet, distinct: list[str], heldout: int):
    assert len(ps.heldout) == heldout and len(ps.train) == len(distinct) - heldout
    assert not set(ps.train) & set(ps.heldout)
    assert set(ps.train) | set(ps.heldout) == set(distinct)
    assert list(ps.train) == [p for p in distinct if p not in ps.heldout]  # training keeps the source order


@pytest.mark.parametrize("writer, name", [(write_txt, "p.txt"), (write_jsonl, "p.jsonl"), (write_parquet, "p.parquet")])
def test_each_format_reads_dedups_and_splits(tmp_path, writer, name):
    raw = ["  " + PROMPTS[0] + "  ", PROMPTS[1], "", PROMPTS[0], *PROMPTS[2:], PROMPTS[5], "   "]
    path = writer(tmp_path / name, raw)  # jsonl/parquet: one row per entry, the empty ones too (dropped)
    ps = load_prompts(str(path), 4)
    check_split(ps, PROMPTS, 4)
    assert ps.source == str(path) and len(ps) == len(PROMPTS)
    # the same prompts in any format give the same hashes
    assert ps.sha256 == load_prompts(str(write_txt(tmp_path / "ref.txt", PROMPTS)), 4).sha256


def test_held_out_split_is_deterministic_and_independent_of_order(tmp_path):
    a = load_prompts(str(write_txt(tmp_path / "a.txt", PROMPTS)), 5)
    assert a == load_prompts(str(tmp_path / "a.txt"), 5)
    shuffled = PROMPTS[:]
    random.Random(0).shuffle(shuffled)
    b = load_prompts(str(write_txt(tmp_path / "b.txt", shuffled + shuffled[:3])), 5)
    assert b.heldout == a.heldout and b.heldout_sha256 == a.heldout_sha256
    assert set(b.train) == set(a.train) and b.sha256 != a.sha256  # the list hash is of the order as read
    # a larger split extends a smaller one: the first N held-out prompts do not depend on the split's size
    assert load_prompts(str(tmp_path / "a.txt"), 8).heldout[:5] == a.heldout
    # adding prompts never moves a training prompt into the held-out split
    more = load_prompts(str(write_txt(tmp_path / "c.txt", PROMPTS + [f"a black cube moves {i}" for i in range(20)])), 5)
    assert set(more.heldout) <= set(a.heldout) | (set(more.heldout) - set(PROMPTS))
    manifest = a.manifest()
    assert manifest == {"source": str(tmp_path / "a.txt"), "count": 24, "train_count": 19, "heldout_count": 5,
                        "sha256": a.sha256, "heldout_sha256": a.heldout_sha256, "heldout": list(a.heldout)}
    json.dumps(manifest)


def test_local_directory_of_two_files(tmp_path):
    d = tmp_path / "prompts"
    (d / "sub").mkdir(parents=True)
    write_txt(d / "b.txt", PROMPTS[12:] + PROMPTS[:2])  # overlaps a.jsonl: deduplicated
    write_jsonl(d / "sub" / "a.jsonl", PROMPTS[:12])
    (d / "README.md").write_text("ignored\n")
    ps = load_prompts(str(d), 3)
    # files in name order: b.txt before sub/a.jsonl
    order = PROMPTS[12:] + PROMPTS[:12]
    check_split(ps, order, 3)
    assert ps.heldout == load_prompts(str(write_txt(tmp_path / "all.txt", PROMPTS)), 3).heldout


def test_tiny_and_config_prompt_sets(tmp_path):
    from hiar.methods.pretrain import eval_prompts
    from hiar.tiny.captions import heldout_prompts, train_prompts

    tiny = prompt_set(load_config("tiny"))
    assert tiny == tiny_prompt_set(load_config("tiny"))
    assert list(tiny.train) == train_prompts() and list(tiny.heldout) == heldout_prompts()
    assert tiny.heldout[0] == eval_prompts(1)[0] and not set(tiny.train) & set(tiny.heldout)
    path = write_txt(tmp_path / "p.txt", PROMPTS)
    cfg = load_config("tiny", [f"data.prompts={path}", "data.heldout_prompts=2"])
    assert prompt_set(cfg) == load_prompts(str(path), 2) and prompt_set(cfg) is prompt_set(cfg)  # cached
    with pytest.raises(ValueError, match="the wan2.1-1.3b preset needs a prompt dataset: set data.prompts="):
        prompt_set(load_config("wan2.1-1.3b"))
    with pytest.raises(ValueError, match="heldout_prompts must be >= 1"):
        load_config("tiny", ["data.heldout_prompts=0"])
    assert load_config("wan2.1-1.3b").data.heldout_prompts == 256


def test_shard_items_carry_their_prompts():
    from hiar.io.storage import ShardPlan
    from hiar.methods.datagen import shard_items

    plan = ShardPlan(7, 3)
    items = shard_items(("p0", "p1"), [0, 2], plan)
    assert items == [{"shard": 0, "indices": [0, 1, 2], "prompts": ["p0", "p1", "p0"]},
                     {"shard": 2, "indices": [6], "prompts": ["p0"]}]


def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    (tmp_path / "dups.txt").write_text("a cat\n a cat \na cat\n\na cat\na cat\n")
    (tmp_path / "p.csv").write_text("prompt\na\nb\n")
    (tmp_path / "nocol.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), tmp_path / "nocol.parquet")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "few.txt").write_text("a\nb\nc\n")
    return [
        ("empty.txt", 1, ValueError, "no prompts"),
        ("dups.txt", 1, ValueError, "5 non-empty lines/rows but only 1 distinct prompt; need at least 2 "
                                    "(data.heldout_prompts=1 held out + 1 for training)"),
        ("missing.txt", 1, FileNotFoundError, "does not exist"),
        ("p.csv", 1, ValueError, "unsupported suffix '.csv'"),
        ("nocol.jsonl", 1, ValueError, "no 'prompt' field"),
        ("nocol.parquet", 1, ValueError, "no 'prompt' column"),
        ("emptydir", 1, FileNotFoundError, "the directory is empty"),
        ("few.txt", 3, ValueError, "only 3 distinct prompts; need at least 4"),
        ("few.txt", 0, ValueError, "heldout_prompts must be an integer >= 1"),
    ]


def test_bad_inputs_name_the_uri(tmp_path):
    for name, heldout, error, message in bad_inputs(tmp_path):
        uri = str(tmp_path / name)
        with pytest.raises(error) as info:
            load_prompts(uri, heldout)
        assert uri in str(info.value) and message in str(info.value), (name, str(info.value))


def test_s3_file_prefix_and_bad_prefixes(s3_server, tmp_path, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    client = s3_server.client()
    client.create_bucket(Bucket="hiar-prompts")
    client.put_object(Bucket="hiar-prompts", Key="set/b.txt", Body="\n".join(PROMPTS[12:]).encode())
    client.put_object(Bucket="hiar-prompts", Key="set/a.jsonl",
                      Body=write_jsonl(tmp_path / "a.jsonl", PROMPTS[:12]).read_bytes())
    client.put_object(Bucket="hiar-prompts", Key="set/_SUCCESS", Body=b"")
    client.put_object(Bucket="hiar-prompts", Key="one/p.parquet",
                      Body=write_parquet(tmp_path / "p.parquet", PROMPTS).read_bytes())
    client.put_object(Bucket="hiar-prompts", Key="dups/p.txt", Body=b"x\nx\n")
    client.put_object(Bucket="hiar-prompts", Key="csv/p.csv", Body=b"prompt\nx\ny\n")

    local = load_prompts(str(write_txt(tmp_path / "all.txt", PROMPTS)), 4)
    for uri in ("s3://hiar-prompts/set", "s3://hiar-prompts/set/"):
        ps = load_prompts(uri, 4)
        assert ps.source == uri
        check_split(ps, PROMPTS, 4)  # a.jsonl then b.txt: name order
        assert ps.heldout == local.heldout and ps.sha256 == local.sha256
    one = load_prompts("s3://hiar-prompts/one/p.parquet", 4)
    assert one.heldout == local.heldout and one.sha256 == local.sha256

    for uri, message in (("s3://hiar-prompts/nothing-here", "no objects under this S3 prefix"),
                         ("s3://hiar-prompts/dups", "only 1 distinct prompt"),
                         ("s3://hiar-prompts/csv", "no .txt/.jsonl/.parquet files under it")):
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            load_prompts(uri, 1)
        assert uri in str(info.value) and message in str(info.value), str(info.value)


def test_generate_without_prompts_exits_2_before_any_compute(tmp_path, capsys):
    """A non-tiny preset with no data.prompts: generate.py stops with exit code 2 and the prompts error, before
    loading the teacher, touching the output or starting Ray."""
    from hiar.jobs.generate import main

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    out = tmp_path / "out"
    rc = main(["--preset", "wan2.1-1.3b", "--kind", "ode_pairs", "--count", "2", "--output", str(out),
               "--set", f"teacher.path={teacher}", "--set", f"run_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "the wan2.1-1.3b preset needs a prompt dataset: set data.prompts=" in err
    assert not out.exists()
    missing = tmp_path / "missing.txt"
    rc = main(["--preset", "wan2.1-1.3b", "--kind", "ode_pairs", "--count", "2", "--output", str(out),
               "--set", f"teacher.path={teacher}", "--set", f"data.prompts={missing}"])
    assert rc == 2 and f"prompts {str(missing)!r} does not exist" in capsys.readouterr().err
