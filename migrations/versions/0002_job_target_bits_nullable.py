"""jobs.target_bits may be null: the pruning methods (nowag-p, wanda) take a sparsity or N:M pattern instead.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("target_bits", existing_type=sa.Float(), nullable=True)


def downgrade() -> None:
    # The older schema has no "no rate": pruning jobs keep their rows with 0 (their method says what they were).
    op.execute("UPDATE jobs SET target_bits = 0 WHERE target_bits IS NULL")
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("target_bits", existing_type=sa.Float(), nullable=False)
