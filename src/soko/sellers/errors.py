"""The sellers domain's problem types."""

from __future__ import annotations

from soko.platform.errors import ProblemError


class SellerSlugTaken(ProblemError):
    slug = "seller-slug-taken"
    title = "This store address is taken"
    status = 409
    description = "Another store already uses this slug; choose another one."


class SellerStateConflict(ProblemError):
    slug = "seller-state-conflict"
    title = "The store is not in a state that allows this"
    status = 409
    description = (
        "Approve and reject need a pending store, suspend an active one, reinstate a "
        "suspended one; `current_status` says where the store is now."
    )


class SellerChoiceNeeded(ProblemError):
    slug = "seller-choice-needed"
    title = "Say which store you act for"
    status = 400
    description = (
        "You belong to several stores: send `X-Seller-Id` with the id of the one this "
        "request is for."
    )


class NotASeller(ProblemError):
    slug = "not-a-seller"
    title = "You do not act for this store"
    status = 403
    description = (
        "Seller routes need a member of a store: you belong to none, or not to the one "
        "`X-Seller-Id` names."
    )


class SellerNotActive(ProblemError):
    slug = "seller-not-active"
    title = "The store is not active"
    status = 403
    description = (
        "Only an approved store that is not suspended may do this (publish, sell); "
        "`seller_status` says where the store is."
    )


class SellerRoleRequired(ProblemError):
    slug = "seller-role-required"
    title = "Your role in this store does not allow this"
    status = 403
    description = "The change needs a higher role in the store (`required_role`)."


class SellerLastOwner(ProblemError):
    slug = "seller-last-owner"
    title = "A store keeps at least one owner"
    status = 409
    description = "The last owner of a store can be neither removed nor given another role."


class SellerMemberExists(ProblemError):
    slug = "seller-member-exists"
    title = "Already a member of this store"
    status = 409
    description = "The user already acts for this store; change their role instead."


class SellerInvitationStateConflict(ProblemError):
    slug = "seller-invitation-state-conflict"
    title = "The invitation is no longer open"
    status = 409
    description = (
        "Only a pending invitation that has not expired can be accepted, declined or "
        "revoked; `current_status` says where it is (accepted, declined, revoked, expired)."
    )


class SellerInvitationLimit(ProblemError):
    slug = "seller-invitation-limit"
    title = "Too many invitations"
    status = 429
    description = (
        "An inviting user sends at most 20 invitations a day, and an address receives at "
        "most 3, from all stores together; `Retry-After` says when one more may be sent."
    )


class SellerApplicationsPending(ProblemError):
    slug = "seller-applications-pending"
    title = "You have as many store applications waiting as you may"
    status = 409
    description = (
        "A user may have at most `max_pending` store applications waiting for review at "
        "once: wait for a decision on one before applying again."
    )
