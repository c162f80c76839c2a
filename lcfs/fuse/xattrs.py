"""Extended attribute handlers of the FUSE frontend (a mixin of ``LayerOperations``).

Most files have no xattrs, yet the kernel and common tools ask for them
all the time: the kernel requests security.capability before every
buffered write, and ``ls -l`` requests security.selinux and
system.posix_acl_access of every file it lists. Two rules keep those
requests away from the store's xattr database:

- A request for a name that no layer has ever stored
  (``store.xattr_name_seen``) fails without a store read. In the security and system namespaces, whose
  names the kernel and tools probe on their own, the answer is EOPNOTSUPP:
  ls then stops asking for that name on the whole mount. Elsewhere (user,
  trusted) it is ENODATA, because programs take EOPNOTSUPP there to mean
  that the file system has no xattrs at all. security.capability gets
  ENODATA too: the kernel treats either error as "no capability", but
  containerd's differ (compareCapabilities in containerd/continuity, as
  Debian packages it for containerd 1.6) accepts only ENODATA and fails a
  diff of two snapshots on EOPNOTSUPP. The rule ends by itself once a
  layer stores the name.
  The two POSIX ACL names count as one, because libacl (and GNU cp -a)
  take EOPNOTSUPP for either to mean that the file system has no ACLs, and
  fail when only one of them returns it.
- Whether an inode has any xattrs comes from the attributes kept in memory
  with lookup and getattr replies (``Attr.has_xattrs``), so getxattr,
  listxattr and removexattr on an inode without xattrs read nothing.

Requests that do reach the xattr database are counted per operation in
``stats.xattr_store_calls``. The xattrs of a removed directory that a
process still has open are served from memory (``_removed_xattrs``).
"""

from __future__ import annotations

import errno

import pyfuse3

from .handler import fuse_handler
from .privileges import caller_from_context


class _NeverStoredErrno(int):
    """The errno EOPNOTSUPP, which pyfuse3's check before setxattr reads as ENODATA.

    pyfuse3 3.5 handles setxattr with XATTR_CREATE by calling the getxattr
    handler first, and goes on only when ``error.errno != ENOATTR`` is
    false. A name that no layer has stored must still be creatable, so
    this value compares equal to ENODATA there. The kernel receives its
    integer value, EOPNOTSUPP. A setxattr with XATTR_REPLACE of such a name
    fails with EOPNOTSUPP rather than ENODATA.
    """

    def __ne__(self, other):
        if other == errno.ENODATA:
            return False
        return int(self) != other

    __hash__ = int.__hash__


class NameNeverStored(pyfuse3.FUSEError):
    """The reply to getxattr of a name that no layer has ever stored."""

    _errno = _NeverStoredErrno(errno.EOPNOTSUPP)

    @property
    def errno(self):
        return self._errno


CAPABILITY_XATTR = b"security.capability"
# Namespaces whose names the kernel and common tools request for every file.
PROBED_NAMESPACES = (b"security.", b"system.")
# Namespaces of the xattrs that setxattr and removexattr accept. The mount
# does not enforce POSIX ACLs (LayerOperations.enable_acl is off), so
# system.posix_acl_access and system.posix_acl_default fail with
# EOPNOTSUPP as on ext4 mounted with noacl, instead of being stored and
# ignored. Other names fail that way on ext4 and tmpfs too.
CHANGEABLE_NAMESPACES = (b"user.", b"trusted.", b"security.")
TRUSTED_NAMESPACE = b"trusted."
# The POSIX ACL names. Only an imported layer's tar stores them, because
# setxattr rejects them.
POSIX_ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")


class XattrHandlers:
    """getxattr, listxattr, setxattr and removexattr of ``LayerOperations``."""

    @fuse_handler()
    async def getxattr(self, inode, name, ctx):
        self.stats.record_getxattr_name(name)
        removed = self._removed_xattrs.get(inode) if self._removed_xattrs else None
        if removed is not None and name in removed:
            return removed[name]
        if not self._xattr_name_seen(name):
            if name.startswith(PROBED_NAMESPACES) and name != CAPABILITY_XATTR:
                raise NameNeverStored(errno.EOPNOTSUPP)
            raise pyfuse3.FUSEError(errno.ENODATA)
        if inode == pyfuse3.ROOT_INODE or removed is not None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        layer, ino = self._target(inode)
        if not self._current_attr(inode, layer, ino).has_xattrs:
            raise pyfuse3.FUSEError(errno.ENODATA)
        self.stats.record_xattr_store_call("getxattr")
        return self.store.getxattr(layer, ino, name)

    def _xattr_name_seen(self, name: bytes) -> bool:
        if name in POSIX_ACL_XATTRS:
            return any(self.store.xattr_name_seen(acl) for acl in POSIX_ACL_XATTRS)
        return self.store.xattr_name_seen(name)

    @fuse_handler()
    async def listxattr(self, inode, ctx):
        if inode == pyfuse3.ROOT_INODE:
            return []
        removed = self._removed_xattrs.get(inode)
        if removed is not None:
            names = list(removed)
        else:
            layer, ino = self._target(inode)
            if not self._current_attr(inode, layer, ino).has_xattrs:
                return []
            self.stats.record_xattr_store_call("listxattr")
            names = self.store.listxattr(layer, ino)
        # ext4 and tmpfs list trusted.* names only to callers with
        # CAP_SYS_ADMIN, and the kernel leaves that filter to the file system.
        # NOTE: the capability is read from /proc/PID/status, relative to the
        # caller's user namespace, where Linux checks it in the initial one.
        if any(name.startswith(TRUSTED_NAMESPACE) for name in names):
            if not caller_from_context(ctx).sys_admin:
                names = [name for name in names if not name.startswith(TRUSTED_NAMESPACE)]
        return names

    @fuse_handler(modifies=True)
    async def setxattr(self, inode, name, value, ctx):
        # pyfuse3 checks XATTR_CREATE and XATTR_REPLACE itself through
        # getxattr before it calls this handler.
        if not name.startswith(CHANGEABLE_NAMESPACES):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        layer, ino = self._target(inode)
        removed = self._removed_xattrs.get(inode)
        if removed is not None:
            removed[name] = value
            self._change_removed_directory(inode, layer, {"has_xattrs": True})
            return
        if self._is_frozen(layer):
            self._retry_if_shared(inode, layer, ino, ctx)
        self.stats.record_xattr_store_call("setxattr")
        self.store.setxattr(layer, ino, name, value)
        self._keep_attr(inode, layer, self.store.getattr(layer, ino))
        # The change set the ctime, which the kernel drops on the reply.
        self._expire_attributes(inode)

    @fuse_handler(modifies=True)
    async def removexattr(self, inode, name, ctx):
        if not name.startswith(CHANGEABLE_NAMESPACES):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        layer, ino = self._target(inode)
        removed = self._removed_xattrs.get(inode)
        if removed is not None:
            if removed.pop(name, None) is None:
                raise pyfuse3.FUSEError(errno.ENODATA)
            self._change_removed_directory(inode, layer, {"has_xattrs": bool(removed)})
            return
        if self._is_frozen(layer):
            self._retry_if_shared(inode, layer, ino, ctx)
            raise pyfuse3.FUSEError(errno.EROFS)
        if not self._current_attr(inode, layer, ino).has_xattrs:
            raise pyfuse3.FUSEError(errno.ENODATA)
        self.stats.record_xattr_store_call("removexattr")
        self.store.removexattr(layer, ino, name)
        self._keep_attr(inode, layer, self.store.getattr(layer, ino))
        # The change set the ctime, which the kernel drops on the reply.
        self._expire_attributes(inode)
