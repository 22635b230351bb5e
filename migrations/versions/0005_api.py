"""api v1: LogInteractions batch ids (idempotent interaction batches)

Revision ID: 0005_api
Revises: 0004_fault
"""
import sqlalchemy as sa
from alembic import op

revision = '0005_api'
down_revision = '0004_fault'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('interaction_batches',
    sa.Column('user_id', sa.String(length=128), nullable=False),
    sa.Column('batch_id', sa.String(length=64), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('logged', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.user_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', 'batch_id')
    )


def downgrade() -> None:
    op.drop_table('interaction_batches')
