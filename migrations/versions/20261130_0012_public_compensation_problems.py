"""orders' problems without the database's text

An order whose compensation failed used to show the failure's full text in `problem`
(statement, parameters, a row's contents); it now shows the error's class and a fixed
sentence. This rewrites what earlier versions stored (the saga row keeps the full text
for operators).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The class is what stood before the first colon ("IntegrityError: (psycopg2...");
    # the sentence is sagas.runner.COMPENSATION_RETRIED (a migration does not import
    # the code it migrates).
    op.execute(
        """
        UPDATE orders
           SET problem = left(coalesce(substring(problem from '^([A-Za-z_][A-Za-z0-9_.]*):'),
                                       'Error'), 100)
                         || ': the compensation failed; it will be retried'
         WHERE problem IS NOT NULL AND problem NOT LIKE '%: the compensation failed; %'
        """
    )


def downgrade() -> None:
    """The earlier text is gone: nothing to restore."""
