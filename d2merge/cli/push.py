"""``d2merge push``: a merged folder to the Hub; its flags are PushOptions' fields, as merge's --push-to's."""

from __future__ import annotations

from typing import Any

import click

from d2merge.cli.flags import options_from
from d2merge.console import ConsoleCommand
from d2merge.options.push import PushOptions


@click.command("push", cls=ConsoleCommand)
@click.argument("folder", type=click.Path())
@click.argument("repo_id")
@options_from(PushOptions)
@click.option("--dry-run", is_flag=True,
              help="Check the folder, then print the files, sizes and model card a push would send. "
                   "Contacts nothing, needs no token.")
def push_command(folder: str, repo_id: str, dry_run: bool, **values: Any) -> None:
    """Publish a merged model FOLDER to the Hugging Face Hub as REPO_ID (OWNER/NAME).

    The folder is refused unless it is complete: config.json, every shard its index names,
    untruncated safetensors, no leftover temp files. Exactly its files are sent (hidden files
    are skipped); README.md, if present, becomes the model card. The repo is created if needed.

    \b
    Examples:
      d2merge push ./merged my-user/llama-merged --dry-run      # what would be sent; offline
      d2merge push ./merged my-user/llama-merged --private      # create private, commit to main
      d2merge push ./merged my-org/llama-merged --revision exp-1   # commit to branch exp-1
      d2merge push ./merged someone/llama-merged --create-pr    # propose as a pull request
      HF_TOKEN=hf_... d2merge push ./merged my-user/llama-merged
      HF_ENDPOINT=https://hub.example.com d2merge push ./merged team/llama-merged

    \b
    Token: --token, else HF_TOKEN, else the cached `hf auth login`; it is never printed.
    Endpoint: HF_ENDPOINT (default https://huggingface.co). HF_HUB_OFFLINE=1 refuses to push.
    HF_HUB_DISABLE_PROGRESS_BARS=1 silences the upload progress bars.
    """
    from d2merge.hub import format_push, push_folder

    options = PushOptions(**values)  # push always pushes: the push_to condition of merge is not checked here
    result = push_folder(folder, repo_id, dry_run=dry_run, **options.values())
    click.echo(format_push(result))
