"""`segmentation-machine listen`: `watch` fed by a DICOM node, so that a PACS can push studies and get models."""

from pathlib import Path

from .common import examples, log
from .watch import add_queue_options, serve_inbox, state_folder


def add_listen_command(commands, common):
    listen = commands.add_parser("listen", parents=[common],
                                 help="receive series pushed by a PACS (DICOM C-STORE) and model each into OUTBOX",
                                 **examples("segmentation-machine listen --out ~/Outbox --allow PACS --port 11112"))
    add_queue_options(listen)
    listen.add_argument("--ae-title", default="SEGMACHINE", help="this node's AE title (default SEGMACHINE)")
    listen.add_argument("--port", type=int, default=11112, help="TCP port (default 11112)")
    listen.add_argument("--host", default="", help="address to listen on (default every interface)")
    listen.add_argument("--allow", action="append", default=[], metavar="AE[,AE...]",
                        help="calling AE titles that may send (required; nobody else may)")
    listen.add_argument("--tls-cert", type=Path, help="PEM certificate: TLS only")
    listen.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert (when not inside it)")
    listen.add_argument("--tls-ca", type=Path, help="PEM CA certificates: senders must show a certificate they signed")
    listen.add_argument("--send-seg-to", metavar="AE@HOST:PORT",
                        help="C-STORE each series' DICOM SEG there (with --format including seg); over TLS when the "
                             "node takes TLS, trusting --tls-ca")
    listen.add_argument("--keep-received", type=float, default=7.0, metavar="DAYS",
                        help="remove a series' received files once it is modelled (or failed) and unchanged for "
                             "DAYS days (default 7; 0: as soon as it is modelled); status.json keeps the result")
    listen.add_argument("--min-free-mb", type=float, default=1024.0, metavar="MB",
                        help="refuse instances (status A700: the PACS sends them again later) while the received "
                             "folder's disk would keep less than MB free (default 1024)")
    listen.set_defaults(run=run_listen, once=False, polling=False)  # received files are local: file events


def run_listen(args):
    from ..core.errors import UserError, install_extra
    from ..core.files import private_folder
    from ..inbox.retention import Retention
    from ..mesh.dicomseg import SEG_FILE
    from ..mesh.export import parse_formats
    try:
        import pynetdicom  # noqa: F401 - used where the node starts
        from ..pacs.dicomnode import (
            RECEIVED, RECEIVING, DicomNode, NodeOptions, parse_destination, send_file, sending_tls_context,
        )
    except ImportError:
        raise UserError(f"listen is a DICOM node, which needs pynetdicom: {install_extra('pacs')}.") from None
    state = Path(state_folder(args)).expanduser().absolute()
    allowed = tuple(title for option in args.allow for title in option.split(",") if title.strip())
    node = DicomNode(NodeOptions(args.ae_title, args.port, allowed, args.host, args.tls_cert, args.tls_key, args.tls_ca,
                                 args.min_free_mb), folder=state / RECEIVED, staging=state / RECEIVING)
    retention = Retention(args.keep_received, lock=node.storing)
    destination = parse_destination(args.send_seg_to) if args.send_seg_to else None
    if destination and "seg" not in parse_formats(args.format):
        raise UserError("--send-seg-to sends each series' DICOM SEG: add seg to --format, e.g. --format stl,seg.")

    sending_tls = sending_tls_context(node.options) if destination else None

    def send_seg(result):
        if destination:
            problem = send_file(result.folder / SEG_FILE, destination, node.options.ae_title, sending_tls)
            if problem:
                log.error("The DICOM SEG was not sent: %s The models are delivered all the same.", problem)

    private_folder(node.folder)  # the inbox must exist before it is watched
    serve_inbox(args, node.folder, f"Listening as {node.describe()}", service=node, modelled=send_seg,
                polled=retention.tick)
