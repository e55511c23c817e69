"""``ckpt rekey``: rotate the key-encryption key of an encrypted store (no data rewritten)."""

from __future__ import annotations

from typing import Any

import click

from ckpt.cli.common import current_encryption, emit_json, json_option, key_options, plugins, storage_option


@click.command("rekey")
@click.argument("url")
@key_options
@click.option(
    "--new-key-file",
    metavar="FILE",
    default=None,
    help="The new key: a file holding 64 hex digits, base64 or 32 raw bytes.",
)
@click.option(
    "--new-key-provider", metavar="SPEC", default=None, help="The new key as a provider spec (kms:..., file:...)."
)
@click.option(
    "--new-kms-key-id",
    metavar="KEY_ID",
    default=None,
    help="The new key in AWS KMS: key id, ARN or alias (region and credentials from the AWS "
    "configuration; --new-key-provider 'kms:ID?region=R' to name them).",
)
@json_option
@storage_option
def rekey_cmd(
    url: str,
    new_key_file: str | None,
    new_key_provider: str | None,
    new_kms_key_id: str | None,
    as_json: bool,
    storage_options: dict[str, Any],
) -> None:
    """Rewrap the data key of the encrypted store at URL with a new key-encryption key.

    The current key comes from --key-file, --key-provider or CKPT_KEY_FILE; the new one
    from exactly one of --new-key-file, --new-key-provider, --new-kms-key-id. Only the
    store's key envelope is rewritten: no object or manifest changes, so rotation takes
    the same time for any size of store. Afterwards the old key no longer opens the store
    (a copy of the old envelope still would: delete backups of it).

    \b
    Examples:
      ckpt rekey file:///runs/exp1 --key-file old.key --new-key-file new.key
      ckpt rekey s3://bucket/exp1 --key-file old.key --new-kms-key-id alias/ckpt-prod
      CKPT_KEY_FILE=old.key ckpt rekey /runs/exp1 --new-key-provider 'kms:alias/ckpt?region=eu-west-1'

    \b
    JSON schema:
      {"url": str, "old_key_id": str, "new_key_id": str}

    Exit codes: 0 rewrapped, 2 no or wrong current key, bad new key, bad URL or plain store.
    """
    from ckpt.errors import EncryptionError
    from ckpt.security.envelope import rewrap
    from ckpt.security.keys import Encryption
    from ckpt.security.providers import KeyFileProvider

    old = current_encryption()
    if old is None:
        raise EncryptionError(f"ckpt rekey {url}: give the current key (--key-file, --key-provider or CKPT_KEY_FILE)")
    given = [o for o in (new_key_file, new_key_provider, new_kms_key_id) if o]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --new-key-file, --new-key-provider, --new-kms-key-id")
    if new_key_file:
        new = Encryption(KeyFileProvider(new_key_file))
    else:
        new = Encryption(plugins().key_provider(new_key_provider or f"kms:{new_kms_key_id}"))
    rewrap(url, old, new, storage_options)
    doc = {"url": url, "old_key_id": old.key_id, "new_key_id": new.key_id}
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"rewrapped the data key of {url}: {old.key_id} -> {new.key_id} (no object rewritten)")
