"""Roles and the permissions they grant: the one declared matrix.

Routes declare the permission they need with :func:`soko.platform.auth.require`; the
matrix below says which roles hold it. The route-matrix test walks every route with a
token for every role and fails on any difference from what these two say.
"""

from __future__ import annotations

from soko.identity.models import Role
from soko.platform.auth import OWN_ACCOUNT

# Every signed-in user may manage their own account, sessions, MFA and API keys, and
# act in their own name (carts, orders, stores): what an API key needs for that.
ACCOUNT_SELF = OWN_ACCOUNT
USERS_READ = "users:read"
USERS_MANAGE = "users:manage"
AUDIT_READ = "audit:read"
IDENTITY_SETTINGS = "identity:settings"
# Commerce: reviewing seller applications, curating categories, seeing every order and
# settling disputes. Buyers and seller members need only to be signed in; what they may
# touch is decided per object (their cart, their orders, their seller's products).
SELLERS_REVIEW = "sellers:review"
CATALOG_MANAGE = "catalog:manage"
ORDERS_READ_ALL = "orders:read_all"
DISPUTES_RESOLVE = "disputes:resolve"
# Money: reading every payment, refunding and settling flagged payments, recording
# payouts and setting commission. Webhooks: managing the marketplace's own endpoints
# (a seller manages its own with no permission beyond membership).
PAYMENTS_READ_ALL = "payments:read_all"
PAYMENTS_MANAGE = "payments:manage"
PAYOUTS_MANAGE = "payouts:manage"
WEBHOOKS_MANAGE = "webhooks:manage"

ALL_PERMISSIONS: frozenset[str] = frozenset(
    {
        ACCOUNT_SELF,
        USERS_READ,
        USERS_MANAGE,
        AUDIT_READ,
        IDENTITY_SETTINGS,
        SELLERS_REVIEW,
        CATALOG_MANAGE,
        ORDERS_READ_ALL,
        DISPUTES_RESOLVE,
        PAYMENTS_READ_ALL,
        PAYMENTS_MANAGE,
        PAYOUTS_MANAGE,
        WEBHOOKS_MANAGE,
    }
)

ROLE_PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.customer: frozenset({ACCOUNT_SELF}),
    Role.seller: frozenset({ACCOUNT_SELF}),
    Role.provider: frozenset({ACCOUNT_SELF}),
    Role.operator: frozenset(
        {
            ACCOUNT_SELF,
            USERS_READ,
            SELLERS_REVIEW,
            CATALOG_MANAGE,
            ORDERS_READ_ALL,
            PAYMENTS_READ_ALL,
        }
    ),
    Role.support: frozenset(
        {
            ACCOUNT_SELF,
            USERS_READ,
            AUDIT_READ,
            ORDERS_READ_ALL,
            DISPUTES_RESOLVE,
            PAYMENTS_READ_ALL,
        }
    ),
    Role.admin: ALL_PERMISSIONS,
}


def permissions_for(roles: frozenset[str] | set[str]) -> frozenset[str]:
    granted: set[str] = set()
    for role in roles:
        try:
            granted |= ROLE_PERMISSIONS[Role(role)]
        except ValueError:
            continue  # a role removed from the code grants nothing
    return frozenset(granted)
