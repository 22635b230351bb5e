"""reference_images: raw-byte reference images tied to the user (and tenant) that uploaded them

Revision ID: 0006_reference_owners
Revises: 0005_api
"""
import sqlalchemy as sa
from alembic import op

revision = '0006_reference_owners'
down_revision = '0005_api'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('reference_images',
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=128), nullable=False),
    sa.Column('tenant', sa.String(length=128), nullable=True),
    sa.Column('image_uri', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.user_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('digest', 'user_id')
    )
    op.create_index(op.f('ix_reference_images_user_id'), 'reference_images', ['user_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_reference_images_user_id'), table_name='reference_images')
    op.drop_table('reference_images')
