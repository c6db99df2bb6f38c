// cargohold's test daemon: stargz-snapshotter (Debian's golang-github-containerd-stargz-snapshotter-dev)
// served over containerd's snapshots gRPC API on a unix socket, so that cargohold's proxy snapshotter is
// tested against a real lazy snapshotter it did not write. Built by build.sh in GOPATH mode.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/BurntSushi/toml"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/keychain/dockerconfig"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func fail(ctx context.Context, err error, format string, args ...interface{}) {
	log.G(ctx).WithError(err).Fatalf(format, args...)
}

func main() {
	address := flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "unix socket to serve the snapshots API on")
	root := flag.String("root", "/var/lib/containerd-stargz-grpc", "the snapshotter's state directory")
	configFile := flag.String("config", "", "optional TOML config (stargz-snapshotter's config.toml schema)")
	level := flag.String("log-level", "info", "logrus level: trace, debug, info, warn, error")
	flag.Parse()

	lvl, err := logrus.ParseLevel(*level)
	if err != nil {
		fmt.Fprintf(os.Stderr, "invalid -log-level %q: %v\n", *level, err)
		os.Exit(2)
	}
	logrus.SetLevel(lvl)
	logrus.SetFormatter(&logrus.JSONFormatter{TimestampFormat: log.RFC3339NanoFixed})
	ctx := log.WithLogger(context.Background(), log.L)

	var cfg service.Config
	if *configFile != "" {
		if _, err := toml.DecodeFile(*configFile, &cfg); err != nil {
			fail(ctx, err, "reading config %q", *configFile)
		}
	}
	if err := os.MkdirAll(*root, 0o700); err != nil {
		fail(ctx, err, "creating root %q", *root)
	}
	if err := service.Supported(*root); err != nil {
		// Only a warning: the daemon still serves, and the tests' own mounts tell what works.
		log.G(ctx).WithError(err).Warn("overlayfs not supported under root")
	}

	keychain := []resolver.Credential{dockerconfig.NewDockerconfigKeychain(ctx)}
	sn, err := service.NewStargzSnapshotterService(ctx, *root, &cfg, service.WithCredsFuncs(keychain...))
	if err != nil {
		fail(ctx, err, "starting the stargz snapshotter")
	}

	server := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(server, snapshotservice.FromSnapshotter(sn))
	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		fail(ctx, err, "creating the socket's directory for %q", *address)
	}
	if err := os.RemoveAll(*address); err != nil {
		fail(ctx, err, "removing a stale socket %q", *address)
	}
	listener, err := net.Listen("unix", *address)
	if err != nil {
		fail(ctx, err, "listening on %q", *address)
	}
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()
	log.G(ctx).WithField("address", *address).WithField("root", *root).Info("serving")

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	select {
	case s := <-signals:
		log.G(ctx).Infof("%v: stopping", s)
	case err := <-served:
		log.G(ctx).WithError(err).Error("server stopped")
	}
	server.Stop()
	// Cleanup unmounts the FUSE layers, so that a stopped daemon leaves nothing mounted under its root.
	if cleaner, ok := sn.(snapshots.Cleaner); ok {
		if err := cleaner.Cleanup(ctx); err != nil {
			log.G(ctx).WithError(err).Warn("cleanup")
		}
	}
	if err := sn.Close(); err != nil {
		log.G(ctx).WithError(err).Warn("close")
	}
}
