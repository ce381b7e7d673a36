"""Why a decision on an approval was refused: each says so in words a reviewer can act on."""

from shared.errors import CorralError


class ApprovalError(CorralError):
    """Base of the approvals' refusals."""


class UnknownApproval(ApprovalError):
    """No approval of that id in that tenant."""


class NotAReviewer(ApprovalError):
    """The caller is not in the reviewer group that may decide this approval now."""


class AlreadyDecided(ApprovalError):
    """Someone decided first (or the deadline did): the message says who and how."""


class PastDeadline(ApprovalError):
    """The approval's deadline passed: its default action decides, not a reviewer."""


class EditRefused(ApprovalError):
    """An edit the policy does not allow, or arguments that are not a JSON object."""


class ReasonMissing(ApprovalError):
    """A denial names its reason: the task fails with it."""
