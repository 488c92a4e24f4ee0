"""The identity domain's problem types."""

from __future__ import annotations

from soko.platform.errors import ProblemError


class InvalidCredentials(ProblemError):
    slug = "invalid-credentials"
    title = "Sign-in failed"
    status = 401
    description = (
        "The identifier or the secret is wrong. The answer never says which, so it cannot "
        "be used to find out who has an account."
    )


class AccountBlocked(ProblemError):
    slug = "account-blocked"
    title = "Account blocked"
    status = 403
    description = "An administrator blocked this account; contact support."


class AccountExists(ProblemError):
    slug = "account-exists"
    title = "An account already uses this email or phone"
    status = 409
    description = "Sign in instead, or reset the password."


class WeakPassword(ProblemError):
    slug = "weak-password"
    title = "Password not accepted"
    status = 422
    description = (
        "The password is too short, too long, or among known breached or common passwords."
    )


class InvalidLinkToken(ProblemError):
    slug = "invalid-link-token"
    title = "Link expired or already used"
    status = 400
    description = "Verification and reset links are single use and expire; ask for a new one."


class InvalidCode(ProblemError):
    slug = "invalid-code"
    title = "Code not accepted"
    status = 400
    description = (
        "The one-time code is wrong, expired, already used, or has had too many guesses; "
        "ask for a new code."
    )


class CodeRequestThrottled(ProblemError):
    slug = "code-request-throttled"
    title = "Too many codes requested"
    status = 429
    description = "Codes are limited per number and per address; `Retry-After` says when."


class InvalidRefreshToken(ProblemError):
    slug = "invalid-refresh-token"
    title = "Refresh token not accepted"
    status = 401
    description = (
        "The refresh token is unknown, expired, revoked, or was already used (which signs "
        "the whole session out). Sign in again."
    )


class LoginMethodDisabled(ProblemError):
    slug = "login-method-disabled"
    title = "Sign-in method disabled"
    status = 403
    description = "The operator has switched this way of signing in off."


class MfaAlreadyEnabled(ProblemError):
    slug = "mfa-already-enabled"
    title = "Two-factor sign-in is already on"
    status = 409
    description = "Disable the current authenticator before enrolling another."


class MfaNotEnabled(ProblemError):
    slug = "mfa-not-enabled"
    title = "Two-factor sign-in is off"
    status = 409
    description = "Enroll and confirm an authenticator first."


class MfaEnrollmentRequired(ProblemError):
    slug = "mfa-enrollment-required"
    title = "Two-factor sign-in required"
    status = 403
    description = (
        "Your role requires an authenticator app, and this way in cannot enroll one: "
        "enroll one, then try again."
    )


class OidcFailed(ProblemError):
    slug = "oidc-failed"
    title = "Social sign-in failed"
    status = 400
    description = (
        "The identity provider's answer could not be verified, or the state did not match."
    )


class InvalidApiKey(ProblemError):
    slug = "invalid-api-key"
    title = "API key not accepted"
    status = 401
    description = "The API key is unknown, expired or revoked."


class AccountDeletionBlocked(ProblemError):
    slug = "account-deletion-blocked"
    title = "The account cannot be deleted yet"
    status = 409
    description = (
        "Something still needs the account's data: orders on their way, or a store it "
        "alone owns. `reasons` says what to finish first."
    )


class ReauthenticationRequired(ProblemError):
    slug = "reauthentication-required"
    title = "Confirm it is you"
    status = 403
    description = (
        "This change needs fresh proof that you own the account: your current password, "
        "or for an account without one, a sign-in within the last few minutes."
    )


class InvalidMfaChallenge(ProblemError):
    slug = "invalid-mfa-challenge"
    title = "Sign-in challenge not accepted"
    status = 401
    description = (
        "The two-factor challenge is unknown, expired, already completed, or has had too "
        "many wrong codes. Sign in again for a new one."
    )


class WrongCurrentPassword(ProblemError):
    slug = "wrong-current-password"
    title = "Current password is wrong"
    status = 403
    description = (
        "Changing the password needs the current one. Repeated failures are throttled like "
        "failed sign-ins; use a reset link if it is forgotten."
    )
