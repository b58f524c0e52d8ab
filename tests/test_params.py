import pytest

from medcomp.params import PRESETS_DIR, ParamsError, load_params


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_every_preset_validates(preset):
    params = load_params(preset)
    assert params.run_name
    assert load_params(PRESETS_DIR / f"{preset}.yaml") == params


def test_kaggle_preset_is_the_papers_setup():
    params = load_params("kaggle_t4")
    assert params.model.id == "llava-hf/llava-1.5-7b-hf"
    assert (params.finetune.lora.r, params.finetune.lora.alpha) == (8, 32)
    assert params.model.dtype == "float16" and params.finetune.compute_dtype == "float16"  # T4: no bf16
    assert params.finetune.fully_trained_modules == ()  # LoRA only on real LLaVA


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((PRESETS_DIR / "embedded.yaml").read_text() + "\nfinetune_extra: 1\n")
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(path) in str(error.value) and "finetune_extra: unknown key" in str(error.value)


def test_nested_unknown_key_and_bad_values_are_all_reported():
    with pytest.raises(ParamsError) as error:
        load_params("embedded", {"finetune": {"epoch": 3, "batch_size": 0}, "model": {"dtype": "float8"}})
    message = str(error.value)
    assert "finetune.epoch: unknown key" in message
    assert "finetune.batch_size" in message and "greater than or equal to 1" in message
    assert "model.dtype" in message and "float32" in message


def test_unknown_disease_is_rejected():
    with pytest.raises(ParamsError, match="unknown disease"):
        load_params("embedded", {"data": {"diseases": ["melanoma", "smallpox"]}})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("run_name: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(listing)


def test_fingerprint_tracks_every_setting():
    base = load_params("embedded")
    assert base.fingerprint() == load_params("embedded").fingerprint()
    assert base.fingerprint() != load_params("embedded", {"finetune": {"learning_rate": 1e-5}}).fingerprint()


@pytest.mark.parametrize("name", [".", "..", "../elsewhere", "a/b", ".hidden", ""])
def test_run_name_must_be_a_plain_folder_name(name):
    with pytest.raises(ParamsError, match="run_name"):
        load_params("embedded", {"run_name": name})
    assert load_params("embedded", {"run_name": "my-run_2.1"}).run_name == "my-run_2.1"


def test_pretraining_images_need_their_own_seed():
    with pytest.raises(ParamsError, match="pretraining.seed equals data.synthetic.seed"):
        load_params("embedded", {"model": {"embedded": {"pretraining": {"seed": 0}}}})
