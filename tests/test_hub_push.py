"""`gqa-convert push` with the real huggingface_hub client against the loopback test hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hubserver import ALICE_TOKEN, BOB_TOKEN
from huggingface_hub import ModelCard, snapshot_download
from safetensors.torch import load_file

from gqa_convert.commands import main
from gqa_convert.errors import (
    AccessError,
    CheckpointError,
    ConfigError,
    HubError,
    VerificationFailed,
)
from gqa_convert.hub import plan_upload, push

MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
    "verification.json",
}


@pytest.fixture
def verified(stories_kv4_verified, tmp_path):
    """A private copy of the verified folder (tests add files to it)."""
    folder = tmp_path / "stories260K-gqa"
    shutil.copytree(stories_kv4_verified, folder)
    return folder


def test_push_then_download_and_load(hub, verified):
    from transformers import AutoModelForCausalLM

    result = push(verified, "alice/stories-gqa")
    files = hub.files("alice/stories-gqa")
    assert MODEL_FILES <= set(files)
    # The conversion record is published, and it names no local path of the machine that made it.
    record = files["gqa_convert.json"].decode()
    assert json.loads(record)["new"]["n_kv"] == 4 and str(verified.parent) not in record and '"/' not in record
    repo = hub.state.repos["alice/stories-gqa"]
    assert len(repo.commits) == 2 and result.commit_oid == repo.branches["main"]  # creation + ONE upload commit
    assert sum(1 for m, p in hub.state.requests if p.endswith("/commit/main")) == 1

    local = snapshot_download("alice/stories-gqa")
    for name in MODEL_FILES:
        assert (verified / name).read_bytes() == open(f"{local}/{name}", "rb").read()
    model = AutoModelForCausalLM.from_pretrained("alice/stories-gqa")
    ref = load_file(verified / "model.safetensors")
    state = model.state_dict()
    for name, tensor in ref.items():
        assert torch.equal(state[name], tensor), name
    card = ModelCard.load("alice/stories-gqa")
    assert card.data.library_name == "transformers"
    assert 'from_pretrained("alice/stories-gqa")' in card.text  # the card was completed with the repo id
    assert {r.metric_type for r in card.data.eval_results} == {"loss", "perplexity"}
    report = json.loads((verified / "verification.json").read_text())
    assert card.data.eval_results[0].metric_value == pytest.approx(report["loss"]["converted"], abs=1e-4)


def test_failed_verification_blocks_push_force_overrides(hub, stories_kv2):
    with pytest.raises(VerificationFailed, match="verification failed .*loss"):
        push(stories_kv2, "alice/kv2")
    assert "alice/kv2" not in hub.state.repos and hub.state.requests == []
    assert main(["push", str(stories_kv2), "--repo", "alice/kv2"]) == 1
    assert main(["push", str(stories_kv2), "--repo", "alice/kv2", "--dry-run"]) == 1  # lists, then refuses
    assert hub.state.requests == []
    push(stories_kv2, "alice/kv2", force=True)
    assert "model.safetensors" in hub.files("alice/kv2")


def test_missing_verification_blocks_push(hub, verified, capsys):
    (verified / "verification.json").unlink()
    assert main(["push", str(verified), "--repo", "alice/x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gqa-convert: error:") and "gqa-convert verify" in err and len(err.splitlines()) == 1
    assert hub.state.requests == []


def test_weights_changed_after_verification_blocks_push(hub, verified):
    from safetensors.torch import save_file

    tensors = load_file(verified / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, verified / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VerificationFailed, match="changed since verification"):
        push(verified, "alice/changed")


def test_pickle_and_training_state_never_uploaded(hub, verified):
    (verified / "pytorch_model.bin").write_bytes(b"pickle")
    (verified / "optimizer.pt").write_bytes(b"pickle")
    (verified / "training_args.json").write_text("{}")
    (verified / "checkpoints").mkdir()
    (verified / "checkpoints" / "step-10.safetensors").write_bytes(b"x")
    (verified / "plots").mkdir()
    (verified / "plots" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    plan = plan_upload(verified)
    skipped = dict(plan.skipped)
    assert skipped["pytorch_model.bin"].startswith("pickle") and "optimizer.pt" in skipped
    assert "checkpoints/step-10.safetensors" in skipped and "training_args.json" in skipped
    push(verified, "alice/clean")
    files = set(hub.files("alice/clean"))
    assert "plots/loss.png" in files
    assert not files & {"pytorch_model.bin", "optimizer.pt", "training_args.json", "checkpoints/step-10.safetensors"}


def test_pickle_only_folder_refused(verified):
    (verified / "model.safetensors").rename(verified / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no safetensors weights.*pytorch_model.bin"):
        plan_upload(verified)


def test_dry_run_lists_and_sends_nothing(hub, verified, capsys):
    assert main(["push", str(verified), "--repo", "alice/dry", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload" in out and "model.safetensors" in out and "KB" in out
    assert hub.state.requests == [] and "alice/dry" not in hub.state.repos


def test_private_repo_and_revision(hub, verified, monkeypatch):
    push(verified, "alice/secret", private=True, revision="v1")
    repo = hub.state.repos["alice/secret"]
    assert repo.private and "model.safetensors" in hub.files("alice/secret", "v1")
    assert "model.safetensors" not in hub.files("alice/secret", "main")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(Exception) as info:  # the hub client refuses without a token: 401
        snapshot_download("alice/secret", revision="v1", token=False)
    assert "401" in str(info.value)


def test_invalid_card_rejected_before_upload(hub, verified):
    text = (verified / "README.md").read_text()
    (verified / "README.md").write_text(text.replace("tags:\n", "tags: [unclosed\n", 1))
    with pytest.raises(ConfigError, match="metadata"):
        push(verified, "alice/badcard")
    assert not any(p.endswith("/commit/main") for _, p in hub.state.requests)
    # YAML that parses locally but that the hub's validator rejects: still nothing committed.
    (verified / "README.md").write_text(text.replace("pipeline_tag: text-generation", "datasets: 7", 1))
    with pytest.raises(ConfigError, match="hub rejected"):
        push(verified, "alice/badcard")
    assert "alice/badcard" not in hub.state.repos


def test_no_access_and_no_token(hub, verified, monkeypatch):
    with pytest.raises(AccessError, match="refused to push to bob/model .*403"):
        push(verified, "bob/model")  # alice's token cannot create under bob
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(AccessError, match="needs a hub token"):
        push(verified, "alice/model")
    with pytest.raises(AccessError, match="401"):
        push(verified, "alice/model", token="hf_wrong")


def test_server_down_then_retry_completes(hub, verified, capsys):
    hub.stop()
    assert main(["push", str(verified), "--repo", "alice/retry"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the hub" in err and "re-run" in err and ALICE_TOKEN not in err
    hub.restart()
    assert main(["push", str(verified), "--repo", "alice/retry"]) == 0
    assert "model.safetensors" in hub.files("alice/retry")


def test_failed_commit_leaves_nothing_and_retry_completes(hub, verified):
    hub.state.fail_commits = 1
    with pytest.raises(HubError, match="HTTP 500.*nothing was committed"):
        push(verified, "alice/atomic")
    assert set(hub.files("alice/atomic")) == {".gitattributes"}  # the repo exists, no partial upload
    push(verified, "alice/atomic")
    assert MODEL_FILES <= set(hub.files("alice/atomic"))


def test_token_never_printed_or_written(hub, verified, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", BOB_TOKEN)
    assert main(["push", str(verified), "--repo", "bob/tok", "--message", "first"]) == 0
    out, err = capsys.readouterr()
    assert BOB_TOKEN not in out + err
    for path in verified.rglob("*"):
        if path.is_file():
            assert BOB_TOKEN.encode() not in path.read_bytes()
    assert hub.state.repos["bob/tok"].messages[hub.state.repos["bob/tok"].branches["main"]] == "first"


def test_bad_repo_id(verified):
    with pytest.raises(ConfigError, match="user/name"):
        push(verified, "no-namespace")


def test_missing_card_is_generated(hub, verified, capsys):
    (verified / "README.md").unlink()
    assert main(["push", str(verified), "--repo", "alice/gen", "--dry-run"]) == 0
    assert "README.md (to be generated)" in capsys.readouterr().out
    assert not (verified / "README.md").exists()  # a dry run writes nothing
    push(verified, "alice/gen")
    assert b"Verification: PASSED" in hub.files("alice/gen")["README.md"]


def test_second_push_leaves_exactly_this_model(hub, verified, capsys):
    """A repo that held another model (one file, pickle, notes): after the push it holds exactly the
    allow-list, in ONE commit, and from_pretrained loads the new weights (not a stale file)."""
    from transformers import AutoModelForCausalLM

    old = {"model.safetensors": b"old weights", "pytorch_model.bin": b"old pickle", "notes.txt": b"x",
           "model-00001-of-00002.safetensors": b"old shard", ".gitattributes": b"*.safetensors filter=lfs\n"}  # fmt: skip
    hub.add_repo("alice/reshard", old)
    commits = len(hub.state.repos["alice/reshard"].commits)
    assert main(["push", str(verified), "--repo", "alice/reshard", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    uploaded = {f["path"] for f in out["files"]}
    assert out["deleted"] == ["model-00001-of-00002.safetensors", "notes.txt", "pytorch_model.bin"]
    assert set(hub.files("alice/reshard")) == uploaded | {".gitattributes"}
    assert len(hub.state.repos["alice/reshard"].commits) == commits + 1
    model = AutoModelForCausalLM.from_pretrained("alice/reshard")
    ref = load_file(verified / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())


def test_failed_push_leaves_the_local_card_as_it_was(hub, verified):
    card = verified / "README.md"
    before = card.read_bytes()
    assert b'from_pretrained("REPO_ID")' in before  # verify's card, waiting for the repo id
    hub.state.fail_commits = 1
    with pytest.raises(HubError):
        push(verified, "alice/cardfail")
    assert card.read_bytes() == before  # the repo id goes into the local card only after the commit lands
    push(verified, "alice/cardfail")
    assert b'from_pretrained("alice/cardfail")' in card.read_bytes()
    assert hub.files("alice/cardfail")["README.md"] == card.read_bytes()


def test_published_record_drops_the_local_source_path(hub, verified):
    from gqa_convert.records import ConversionRecord

    local = ConversionRecord.read(verified)
    assert local is not None and local.source_path and Path(local.source_path).is_absolute()  # kept here
    push(verified, "alice/record")
    published = json.loads(hub.files("alice/record")["gqa_convert.json"])
    assert "source_path" not in published and published["source"] == local.source
    assert local.source_path not in json.dumps(published)
