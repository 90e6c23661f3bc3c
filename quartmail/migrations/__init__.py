"""quartmail's Alembic migrations: the outbox's tables, as a branch an app includes.

The revisions in ``versions/`` make and change the tables of
:class:`quartmail.outbox.OutboxBase`. They form their own branch, labelled
:data:`BRANCH`, with its own base, so an app's Alembic environment takes them
beside its own revisions, in one ``alembic_version`` table: add
:data:`VERSIONS` to ``version_locations``, ``OutboxBase.metadata`` to
``target_metadata``, and run ``alembic upgrade heads``. See the docs' page
"Migrations".
"""

from __future__ import annotations

__all__ = ["BASELINE", "BRANCH", "CLAIMED_BY", "RATE_LIMIT", "SUPPRESSION", "VERSIONS"]

#: The branch label of quartmail's revisions: ``alembic upgrade quartmail@head``.
BRANCH = "quartmail"
#: Where the revisions are, as an Alembic ``version_locations`` entry (a package resource).
VERSIONS = "quartmail:migrations/versions"
#: The revision that makes ``mail_outbox`` as quartmail created it before ``claimed_by``.
BASELINE = "qm0001"
#: The revision that adds ``mail_outbox.claimed_by``.
CLAIMED_BY = "qm0002"
#: The revision that adds ``mail_suppression`` and ``mail_outbox.transactional``.
SUPPRESSION = "qm0003"
#: The revision that adds ``mail_rate_limit`` (``MAIL_RATE_LIMIT`` across processes).
RATE_LIMIT = "qm0004"
