"""Alembic environment: target metadata from api.db.models, URL from (in order) the caller
(api.db.migrate passes it in config.attributes), `-x url=...`, alembic.ini's sqlalchemy.url,
then Settings (NWC_DATABASE_URL or the embedded SQLite default)."""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context

from api.core.config import get_settings
from api.db.models import Base
from api.db.session import make_engine
from api.db.types import UTCDateTime

config = context.config
if config.config_file_name is not None:  # the alembic CLI: log as alembic.ini says; programs keep their logging
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    return url or config.get_main_option("sqlalchemy.url") or get_settings().db_url


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # Autogenerate writes the plain column type for our decorator, so revisions do not import app code.
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(**kw: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_item=_render_item,
        **kw,
    )


def run_offline() -> None:
    url = _url()
    _configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    engine = make_engine(_url(), null_pool=True)
    try:
        with engine.connect() as conn:
            # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
            _configure(connection=conn, render_as_batch=conn.dialect.name == "sqlite")
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
