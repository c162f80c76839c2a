// Package containerd runs containerd's own snapshotter test suite against a
// running `lcfs daemon --snapshotter-socket`, through containerd's proxy
// snapshotter client, the same client containerd uses for proxy plugins.
//
// tests/test_snapshotter_suite.py builds and runs it offline in GOPATH mode
// against Debian's golang-github-containerd-containerd-dev (containerd
// 1.6.20), with the daemon's socket in LCFS_SNAPSHOTTER_SOCKET.
package containerd

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"github.com/containerd/continuity/fs/fstest"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

// connect returns a proxy snapshotter on a connection of its own, closed
// by the returned function.
func connect() (snapshots.Snapshotter, func() error, error) {
	socket := os.Getenv("LCFS_SNAPSHOTTER_SOCKET")
	if socket == "" {
		return nil, nil, fmt.Errorf("LCFS_SNAPSHOTTER_SOCKET is not set; run this test through tests/test_snapshotter_suite.py")
	}
	dialer := func(ctx context.Context, address string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", address)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, socket, grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithContextDialer(dialer))
	if err != nil {
		return nil, nil, fmt.Errorf("cannot connect to the lcfs snapshotter at %s: %w", socket, err)
	}
	client := snapshotsapi.NewSnapshotsClient(conn)
	return proxy.NewSnapshotter(client, "lcfs"), conn.Close, nil
}

func TestSnapshotterSuite(t *testing.T) {
	testsuite.SnapshotterSuite(t, "lcfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return connect()
	})
}

// TestRenameInChildSnapshot runs the rename case that the 1.6 suite skips
// because overlayfs fails it on some kernels. It adds two more cases: the
// rename of a directory with contents inherited from the parent, and a
// rename onto the name of a deleted directory.
func TestRenameInChildSnapshot(t *testing.T) {
	sn, closeConnection, err := connect()
	if err != nil {
		t.Fatal(err)
	}
	defer closeConnection()
	ctx := namespaces.WithNamespace(context.Background(), "lcfs-rename")
	work := t.TempDir()
	flat := filepath.Join(work, "flat")
	if err := os.Mkdir(flat, 0o755); err != nil {
		t.Fatal(err)
	}

	layers := []fstest.Applier{
		fstest.Apply(
			fstest.CreateDir("/dir1", 0o700),
			fstest.CreateDir("/somefiles", 0o700),
			fstest.CreateFile("/somefiles/f1", []byte("was here first!"), 0o644),
			fstest.CreateFile("/somefiles/f2", []byte("nothing interesting"), 0o644),
			fstest.CreateDir("/tree", 0o755),
			fstest.CreateDir("/tree/sub", 0o755),
			fstest.CreateFile("/tree/sub/leaf", []byte("leaf"), 0o644),
			fstest.CreateDir("/old", 0o755),
			fstest.CreateFile("/old/gone", []byte("gone"), 0o644),
		),
		fstest.Apply(
			fstest.Rename("/dir1", "/dir2"),
			fstest.CreateFile("/somefiles/f1-overwrite", []byte("new content 1"), 0o644),
			fstest.Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
			fstest.Rename("/somefiles/f2", "/somefiles/f3"),
			fstest.Rename("/tree", "/moved-tree"),
			fstest.RemoveAll("/old"),
			fstest.CreateDir("/new", 0o755),
			fstest.CreateFile("/new/here", []byte("here"), 0o644),
			fstest.Rename("/new", "/old"),
		),
	}

	parent := ""
	var created []string
	defer func() {
		for i := len(created) - 1; i >= 0; i-- {
			if err := sn.Remove(ctx, created[i]); err != nil {
				t.Errorf("remove snapshot %s: %v", created[i], err)
			}
		}
	}()
	for i, layer := range layers {
		key := filepath.Join(work, fmt.Sprintf("prepare-%d", i))
		target := filepath.Join(work, fmt.Sprintf("mount-%d", i))
		if err := os.Mkdir(target, 0o755); err != nil {
			t.Fatal(err)
		}
		mounts, err := sn.Prepare(ctx, key, parent)
		if err != nil {
			t.Fatalf("prepare layer %d: %v", i, err)
		}
		if err := mount.All(mounts, target); err != nil {
			t.Fatalf("mount layer %d: %v", i, err)
		}
		applyErr := layer.Apply(target)
		if err := mount.UnmountAll(target, unix.MNT_DETACH); err != nil {
			t.Fatalf("unmount layer %d: %v", i, err)
		}
		if applyErr != nil {
			t.Fatalf("apply layer %d through the mount: %v", i, applyErr)
		}
		if err := layer.Apply(flat); err != nil {
			t.Fatalf("apply layer %d to the reference directory: %v", i, err)
		}
		name := filepath.Join(work, fmt.Sprintf("committed-%d", i))
		if err := sn.Commit(ctx, name, key); err != nil {
			t.Fatalf("commit layer %d: %v", i, err)
		}
		created = append(created, name)
		parent = name
	}

	view := filepath.Join(work, "view")
	target := filepath.Join(work, "view-mount")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	mounts, err := sn.View(ctx, view, parent)
	if err != nil {
		t.Fatal(err)
	}
	created = append(created, view)
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	defer mount.UnmountAll(target, unix.MNT_DETACH)
	if err := fstest.CheckDirectoryEqual(flat, target); err != nil {
		t.Fatalf("view of the top snapshot differs from the reference directory: %v", err)
	}
}
