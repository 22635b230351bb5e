"""fault tolerance: request heartbeats, dispatch/claim counters, worker heartbeats, the admission counter

Revision ID: 0004_fault
Revises: 0003_auth
"""
import sqlalchemy as sa
from alembic import op

revision = '0004_fault'
down_revision = '0003_auth'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('render_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('dispatches', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('attempts', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('worker', sa.String(length=128), nullable=True))
        batch_op.create_index('ix_render_requests_status_heartbeat', ['status', 'heartbeat_at'], unique=False)
    with op.batch_alter_table('render_requests', schema=None) as batch_op:  # defaults live in the ORM
        batch_op.alter_column('dispatches', server_default=None)
        batch_op.alter_column('attempts', server_default=None)
    op.create_table('worker_beats',
    sa.Column('worker_id', sa.String(length=191), nullable=False),
    sa.Column('queues', sa.JSON(), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('worker_id')
    )
    with op.batch_alter_table('worker_beats', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_worker_beats_last_seen'), ['last_seen'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('worker_beats', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_worker_beats_last_seen'))
    op.drop_table('worker_beats')
    with op.batch_alter_table('render_requests', schema=None) as batch_op:
        batch_op.drop_index('ix_render_requests_status_heartbeat')
        batch_op.drop_column('worker')
        batch_op.drop_column('attempts')
        batch_op.drop_column('dispatches')
        batch_op.drop_column('heartbeat_at')
