"""Where each component lives: the layouts of a snapshot, and a source (file, folder, hub repo id) resolved to files.

Follows the two layouts of `black-forest-labs/FLUX.1-schnell` (checkpoints.md sections 1 and 8): the BFL single files
(`flux1-schnell.safetensors`, `ae.safetensors`) and the diffusers folders (`transformer/` sharded with its index JSON,
`vae/`, `text_encoder/`, sharded `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`); also this project's own single
files with a sidecar config (`flux.safetensors` + `flux_config.json`, `ae.safetensors`, `t5.safetensors`). Differs
from diffusers' and transformers' `from_pretrained` in: one small table (`COMPONENTS`) describes every component's
layouts, and one matcher serves a local folder, the hub cache and the hub's file list alike.

Notable features: hub access through huggingface_hub, with its cache and environment (`HF_HOME`, `HF_HUB_CACHE`,
`HF_TOKEN`, `HF_HUB_OFFLINE`, read at call time); only one layout's files are fetched, a layout already in the cache is
used as it is (unless a shard its index names is missing), and the files and sizes are printed before a download
starts. A missing component is reported with what was expected, what was found, and the `hf download` command.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import MALFORMED, CheckpointNotFoundError

DEFAULT_REPO = "black-forest-labs/FLUX.1-schnell"


def sidecar_name(file: str) -> str:
    """The config written next to one of our single files: `flux.safetensors` -> `flux_config.json`."""
    return file.removesuffix(".safetensors") + "_config.json"


@dataclass(frozen=True)
class Layout:
    """One way a component is stored in a snapshot.

    kind "file": one safetensors file at the top with our tensor names (`file`; for the transformer, None = the
    top-level `*.safetensors` no other component claims), with an optional sidecar `{file stem}_config.json` holding
    our config dataclass's fields (required when `sidecar` is True). kind "folder": `folder/config.json` +
    `folder/{stem}.safetensors`, or shards `folder/{stem}-00001-of-0000n.safetensors` + the index JSON. kind
    "files": `folder/` holding every file of one of the `needs` groups (a tokenizer, a scheduler).
    """

    kind: str
    folder: str = ""
    stem: str = ""
    file: str | None = None
    needs: tuple[tuple[str, ...], ...] = ()
    sidecar: bool = False
    sai: bool = False  # Stability AI's single file (sd3.5_*.safetensors), not a BFL one

    def describe(self) -> str:
        if self.kind == "file" and self.sidecar:
            return f"{self.file} with {sidecar_name(self.file)} at the top"
        if self.kind == "file" and self.sai:
            return "Stability AI's single file at the top (sd3.5_large_turbo.safetensors or the like)"
        if self.kind == "file":
            return f"a BFL single file at the top ({self.file or 'flux1-schnell.safetensors'})"
        if self.kind == "folder":
            return (
                f"{self.folder}/ with config.json and {self.stem}.safetensors (or sharded {self.stem}-0000i-of-0000n"
                f".safetensors with {self.stem}.safetensors.index.json)"
            )
        return f"{self.folder}/ with " + " or ".join(" + ".join(group) for group in self.needs)

    def fetch_command(self, repo: str | None, local_dir: Path | None = None) -> str:
        repo = repo or DEFAULT_REPO
        if self.kind == "file" and self.sai:
            command = f'hf download {repo} --include "sd3*.safetensors"'
        elif self.kind == "file":
            name = self.file or ("flux1-schnell.safetensors" if repo == DEFAULT_REPO else '--include "flux1-*"')
            sidecar = f" {sidecar_name(self.file)}" if self.sidecar else ""
            command = f"hf download {repo} {name}{sidecar}"
        else:
            command = f"hf download {repo}" + (f' --include "{self.folder}/*"' if self.folder else "")
        return command + (f" --local-dir {local_dir}" if local_dir is not None else "")


@dataclass(frozen=True)
class Component:
    title: str
    layouts: tuple[Layout, ...]  # in order of preference when several are complete
    float16_ok: bool = False  # float16 is refused unless the model runs safely in it

    def fetch_commands(self, repo: str | None, local_dir: Path | None = None) -> str:
        return "; or ".join(layout.fetch_command(repo, local_dir) for layout in self.layouts)


COMPONENTS: dict[str, Component] = {
    # float16: the transformer needs activation clamps (diffusers #9097), T5 and the autoencoder overflow to NaN
    # (both modules refuse it); CLIP-L was trained in float16.
    "flux": Component("Flux transformer", (Layout("file"), Layout("folder", "transformer", "diffusion_pytorch_model"))),
    "autoencoder": Component(
        "autoencoder", (Layout("file", file="ae.safetensors"), Layout("folder", "vae", "diffusion_pytorch_model"))
    ),
    # the single files with a sidecar config are this project's own layout (the built-in shapes model)
    "t5": Component(
        "T5 text encoder",
        (Layout("folder", "text_encoder_2", "model"), Layout("file", file="t5.safetensors", sidecar=True)),
    ),
    "clip": Component(
        "CLIP text encoder",
        (Layout("folder", "text_encoder", "model"), Layout("file", file="clip.safetensors", sidecar=True)),
        float16_ok=True,
    ),
    # Stable Diffusion 3.5: diffusers folders first, then Stability AI's single file (MM-DiT and autoencoder)
    "sd3": Component(
        "SD3.5 transformer", (Layout("folder", "transformer", "diffusion_pytorch_model"), Layout("file", sai=True))
    ),
    "sd3_autoencoder": Component(
        "SD3.5 autoencoder", (Layout("folder", "vae", "diffusion_pytorch_model"), Layout("file", sai=True))
    ),
    "sd3_t5": Component("T5 text encoder", (Layout("folder", "text_encoder_3", "model"),)),
    "sd3_t5_tokenizer": Component(
        "T5 tokenizer", (Layout("files", "tokenizer_3", needs=(("spiece.model",), ("tokenizer.json",))),)
    ),
    "t5_tokenizer": Component(
        "T5 tokenizer", (Layout("files", "tokenizer_2", needs=(("spiece.model",), ("tokenizer.json",))),)
    ),
    "clip_tokenizer": Component(
        "CLIP tokenizer", (Layout("files", "tokenizer", needs=(("vocab.json", "merges.txt"),)),)
    ),
    # SD3's OpenCLIP bigG (text_encoder_2/, shipped in float16 like CLIP-L); its tokenizer pads with "!", which only
    # special_tokens_map.json / tokenizer_config.json say, so one of them is needed too
    "clip_2": Component("CLIP-G text encoder", (Layout("folder", "text_encoder_2", "model"),), float16_ok=True),
    "clip_2_tokenizer": Component(
        "CLIP-G tokenizer",
        (
            Layout(
                "files",
                "tokenizer_2",
                needs=(
                    ("vocab.json", "merges.txt", "special_tokens_map.json"),
                    ("vocab.json", "merges.txt", "tokenizer_config.json"),
                ),
            ),
        ),
    ),
    # CogVideoX (THUDM/CogVideoX-2b, -5b): diffusers folders only
    "cogvideox": Component("CogVideoX transformer", (Layout("folder", "transformer", "diffusion_pytorch_model"),)),
    "cogvideox_autoencoder": Component("CogVideoX autoencoder", (Layout("folder", "vae", "diffusion_pytorch_model"),)),
    "cogvideox_t5": Component("T5 text encoder", (Layout("folder", "text_encoder", "model"),)),
    # which sampler the model was made for (DDIM for CogVideoX-2b, DPM for -5b) and its noise schedule
    "cogvideox_scheduler": Component(
        "CogVideoX scheduler", (Layout("files", "scheduler", needs=(("scheduler_config.json",),)),)
    ),
    "cogvideox_t5_tokenizer": Component(
        "T5 tokenizer", (Layout("files", "tokenizer", needs=(("spiece.model",), ("tokenizer.json",))),)
    ),
}


def match_layout(layout: Layout, names: set[str]) -> tuple[str, ...] | None:
    """The files of `layout` among `names` (paths relative to the snapshot), or None when it is incomplete."""
    if layout.kind == "file":
        others = ("ae.safetensors", "t5.safetensors", "clip.safetensors")
        tops = sorted(n for n in names if "/" not in n and n.endswith(".safetensors") and n not in others)
        lead = "sd3" if layout.sai else "flux"
        picks = [layout.file] if layout.file else tops if len(tops) == 1 else [n for n in tops if n.startswith(lead)]
        if len(picks) != 1 or picks[0] not in names:
            return None
        sidecar = sidecar_name(picks[0])
        if sidecar in names:
            return picks[0], sidecar
        return None if layout.sidecar else (picks[0],)
    prefix = f"{layout.folder}/" if layout.folder else ""
    if layout.kind == "files":
        inside = {n[len(prefix) :] for n in names if n.startswith(prefix) and "/" not in n[len(prefix) :]}
        if any(set(group) <= inside for group in layout.needs):
            return tuple(sorted(prefix + n for n in inside))
        return None
    config, single = f"{prefix}config.json", f"{prefix}{layout.stem}.safetensors"
    index = f"{single}.index.json"
    shards = sorted(n for n in names if re.fullmatch(rf"{re.escape(prefix + layout.stem)}-\d+-of-\d+\.safetensors", n))
    if config in names and single in names:
        return config, single
    if config in names and index in names and shards:
        return (config, index, *shards)
    return None


@dataclass(frozen=True)
class Found:
    """A component's files: `files` relative to `root`, stored in `layout`; `repo` is the hub id it came from."""

    root: Path
    layout: Layout
    files: tuple[str, ...]
    repo: str | None = None

    @property
    def index(self) -> str | None:
        """The index JSON of a sharded checkpoint (None for a single file)."""
        return next((f for f in self.files if f.endswith(".index.json")), None)

    @property
    def where(self) -> str:
        """The weights file, or the index of a sharded checkpoint."""
        return str(self.root / (self.index or next(f for f in self.files if f.endswith(".safetensors"))))

    def repair_hint(self, *paths: Path, missing: bool = False) -> str:
        """What to do about damaged files of this component (or, with `missing`, absent ones), as a sentence.

        From the hub cache: fetch exactly those files again, with `--force-download` for a damaged one (the hub
        client trusts a cached file and would keep the damaged copy). From a local folder: copy intact files in; a
        hub download into someone's folder could mix another model's files into theirs, so it is offered only as the
        hub id, whose files go to the cache. The built-in model's files are restored from git."""
        names = [Path(p).relative_to(self.root).as_posix() if Path(p).is_relative_to(self.root) else str(p)
                 for p in paths]  # fmt: skip
        listed = " ".join(names)
        if self.repo is not None:
            if missing:
                return f"Fetch {'them' if len(names) > 1 else 'it'}: hf download {self.repo} {listed}"
            return f"Fetch it again, replacing the damaged copy: hf download {self.repo} {listed} --force-download"
        if self.root.resolve() == BUILTIN:
            files = " ".join(f"shapes/weights/{n}" for n in names)
            return f"The built-in model ships with the repository: restore it with git checkout -- {files}"
        if missing:
            hint = f"{self.root} is a local folder, not the hub cache: copy {listed} into it from their source"
        else:
            hint = "It is a local file, not from the hub cache: replace it with an intact copy from its source"
        if all(on_hub(n) for n in names):
            hint += (
                f"; or load the hub id {DEFAULT_REPO} instead, which keeps its files in the Hugging Face cache "
                f"(hf download {DEFAULT_REPO} {listed})"
            )
        return hint


# the files of black-forest-labs/FLUX.1-schnell that the layouts above read, and the built-in model's folder
HUB_FILES = ("flux1-schnell.safetensors", "ae.safetensors")
HUB_FOLDERS = ("transformer/", "vae/", "text_encoder/", "text_encoder_2/", "tokenizer/", "tokenizer_2/")
BUILTIN = Path(__file__).resolve().parents[1] / "shapes" / "weights"


def on_hub(name: str) -> bool:
    """Whether a path relative to a snapshot names a file of the official repo's layouts."""
    return name in HUB_FILES or name.startswith(HUB_FOLDERS)


def index_shards(index: Path) -> set[str]:
    """The shard file names an index JSON maps tensors to; raises what `MALFORMED` lists when it is damaged."""
    return set(json.loads(index.read_text())["weight_map"].values())


def shards_present(found: Found) -> bool:
    """Every shard the index names is on disk (an interrupted download leaves some out)."""
    if found.index is None:
        return True
    index = found.root / found.index
    try:
        shards = index_shards(index)
    except MALFORMED:
        return False
    return all(index.with_name(shard).is_file() for shard in shards)


def list_folder(folder: Path, layouts: Iterable[Layout]) -> set[str]:
    """Files at the top of `folder` and inside the layouts' sub-folders, as relative posix paths."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    for sub in {layout.folder for layout in layouts if layout.folder}:
        if (folder / sub).is_dir():
            names |= {f"{sub}/{p.name}" for p in (folder / sub).iterdir() if p.is_file()}
    return names


def find_in_folder(folder: Path, component: str, repo: str | None = None) -> Found | None:
    """The first complete layout of `component` in `folder`; the folder may also be the component's own sub-folder."""
    layouts = COMPONENTS[component].layouts
    names = list_folder(folder, layouts)
    for layout in layouts:
        files = match_layout(layout, names)
        if files is not None:
            return Found(folder, layout, files, repo)
    for layout in layouts:  # e.g. source = ".../FLUX.1-schnell/vae"
        if layout.kind != "file" and (files := match_layout(replace(layout, folder=""), names)) is not None:
            return Found(folder, replace(layout, folder=""), files, repo)
    return None


def not_found(component: str, where: str, found_names: Iterable[str], repo: str | None, local_dir: Path | None):
    spec = COMPONENTS[component]
    names = sorted(found_names)
    listing = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "") or "nothing"
    return CheckpointNotFoundError(
        f"no {spec.title} in {where}: expected "
        + " or ".join(layout.describe() for layout in spec.layouts)
        + f". Found: {listing}. "
        + (f"Fetch it with: {spec.fetch_commands(repo)}" if local_dir is None else folder_hint(component, local_dir))
    )


def folder_hint(component: str, folder: Path) -> str:
    """What to do about a component missing from a local folder: never a hub download into it (another model's files
    would mix with the user's). The built-in model is restored from git; another folder gets the files copied in, or
    the hub id is offered, whose files go to the Hugging Face cache."""
    spec = COMPONENTS[component]
    if folder.resolve() == BUILTIN:
        return "The built-in model ships with the repository: restore it with git checkout -- shapes/weights"
    hub = " or ".join(layout.folder + "/" if layout.folder else layout.file or "" for layout in spec.layouts)
    hint = f"{folder} is a local folder: copy the {spec.title} ({hub}) into it from the model's source"
    if component in ("flux", "autoencoder", "t5", "clip", "t5_tokenizer", "clip_tokenizer"):  # FLUX.1-schnell's
        hint += (
            f", or load the hub id {DEFAULT_REPO} instead, whose files go to the Hugging Face cache "
            f"({spec.fetch_commands(DEFAULT_REPO)})"
        )
    return hint


# ---- the hub -------------------------------------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder from the environment as it is now (the library reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ
    for value in (env.get("HF_HUB_CACHE"), env.get("HUGGINGFACE_HUB_CACHE")):
        if value:
            return Path(os.path.expandvars(value)).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value.upper() in ("1", "ON", "YES", "TRUE") if value is not None else constants.HF_HUB_OFFLINE


def cached_snapshot(repo: str, cache: Path) -> Path | None:
    """The cached snapshot of the repo's main branch: models--org--name/snapshots/<commit of refs/main>."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo_dir / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None


def human_size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e8 else f"{num_bytes / 1e6:.1f} MB"


def find_on_hub(repo: str, component: str) -> Found:
    """Use a complete layout from the cache; else, unless offline, download the layout with the least left to fetch."""
    # imported here, at call time, so that tests can stand fakes in for huggingface_hub's functions
    from huggingface_hub import HfApi, snapshot_download, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    spec, cache = COMPONENTS[component], hub_cache_dir()
    snapshot = cached_snapshot(repo, cache)
    found = find_in_folder(snapshot, component, repo) if snapshot is not None else None
    if found is not None and (hub_offline() or shards_present(found)):
        return found  # offline, a missing shard is reported when the index is read
    if hub_offline():
        cached = list_folder(snapshot, spec.layouts) if snapshot is not None else []
        raise not_found(component, f"the cache {cache} for {repo} (HF_HUB_OFFLINE is set)", cached, repo, None)
    try:
        info = HfApi().model_info(repo, files_metadata=True)
    except GatedRepoError as error:
        raise CheckpointNotFoundError(
            f"{repo} is gated: accept its licence on https://huggingface.co/{repo}, then log in (`hf auth login`) or "
            "set HF_TOKEN"
        ) from error
    except RepositoryNotFoundError as error:
        raise CheckpointNotFoundError(f"{repo} is not on the hub (or is private: set HF_TOKEN)") from error
    except Exception as error:  # no network, hub down: say so, with what the cache lacks
        raise CheckpointNotFoundError(
            f"cannot list {repo} on the hub ({type(error).__name__}: {error}) and the cache {cache} has no complete "
            f"{spec.title}; fetch it with: {spec.fetch_commands(repo)}"
        ) from error
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    options = [(layout, files) for layout in spec.layouts if (files := match_layout(layout, set(sizes)))]
    if not options:
        raise not_found(component, f"the hub repo {repo}", sizes, repo, None)

    def missing(files: tuple[str, ...]) -> list[str]:
        return [f for f in files if not isinstance(try_to_load_from_cache(repo, f, cache, revision=info.sha), str)]

    layout, files = min(options, key=lambda option: sum(sizes[f] for f in missing(option[1])))  # first wins ties
    todo = missing(files)
    if todo:
        total = sum(sizes[f] for f in todo)
        print(f"Downloading the {spec.title} from {repo}: {len(todo)} file(s), {human_size(total)}, into {cache}")
        for f in todo[:8]:
            print(f"  {f}  {human_size(sizes[f])}")
        if len(todo) > 8:
            print(f"  ... and {len(todo) - 8} more")
    # the main branch (not info.sha) so that refs/main is written and the next call, even offline, finds the files
    root = Path(snapshot_download(repo, allow_patterns=list(files), cache_dir=cache))
    return Found(root, layout, files, repo)


def check_sidecar(found: Found) -> None:
    """A single file without its `{stem}_config.json` in a folder of this project's own layout (other sidecars or a
    recipe.json beside it) lost its config: read as a BFL file it would get FLUX.1's presets (RoPE axes, latent
    scale and shift) and give wrong results without an error."""
    if found.layout.kind != "file" or any(f.endswith("_config.json") for f in found.files):
        return
    own = sorted(p.name for p in found.root.iterdir() if p.name.endswith("_config.json") or p.name == "recipe.json")
    if own:
        weights, sidecar = found.files[0], sidecar_name(found.files[0])
        fix = ("restore it with git checkout -- shapes/weights" if found.root.resolve() == BUILTIN
               else "restore it from the model's source")  # fmt: skip
        raise CheckpointNotFoundError(
            f"{found.root / weights} has no {sidecar} beside it, while {', '.join(own)} make {found.root} a folder of "
            f"this project's layout, whose weights files need their config; {fix}"
        )


def locate(source: str | Path, component: str) -> Found:
    """Resolve `source` (a `.safetensors` file, a local folder, or a hub repo id) to the component's files."""
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"model source {source!r} is a {type(source).__name__}; give a hub id, a folder or a file")
    path = Path(source).expanduser()
    if path.is_file():
        if component not in ("flux", "autoencoder", "sd3", "sd3_autoencoder") or path.suffix != ".safetensors":
            raise ValueError(
                f"the {COMPONENTS[component].title} loads from a snapshot folder or a hub repo id, not from the file "
                f"{path}; single .safetensors files are accepted for the Flux transformer and the autoencoder"
            )
        sidecar = path.with_name(sidecar_name(path.name))
        files = (path.name, sidecar.name) if sidecar.is_file() else (path.name,)
        return Found(path.parent, Layout("file", file=path.name), files)
    if path.is_dir():
        found = find_in_folder(path, component)
        if found is None:
            layouts = COMPONENTS[component].layouts
            raise not_found(component, f"the folder {path}", list_folder(path, layouts), None, path)
        check_sidecar(found)
        return found
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith((".", "/", "~")):
        return find_on_hub(str(source), component)
    raise CheckpointNotFoundError(f"{source} is neither a file, a folder, nor a hub repo id (like {DEFAULT_REPO})")
